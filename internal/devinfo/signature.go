package devinfo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// Signature is a sign of data on a device: a file system, a partition
// table, a RAID or LVM member, swap, LUKS…
type Signature struct {
	Type   string // e.g. "ext4", "swap", "dos", "gpt", "LVM2_member", "linux_raid_member", "crypto_LUKS"
	Offset int64  // of the magic that identified it, in bytes from the start of the device
	UUID   string // empty when the signature has none
	Label  string // empty when the signature has none
}

// String returns e.g. `ext4 (UUID ed76c95b-…, label "data") at offset 0x438`.
func (s Signature) String() string {
	var attrs []string
	if s.UUID != "" {
		attrs = append(attrs, "UUID "+s.UUID)
	}
	if s.Label != "" {
		attrs = append(attrs, "label "+strconv.Quote(s.Label))
	}
	var b strings.Builder
	b.WriteString(s.Type)
	if len(attrs) > 0 {
		b.WriteString(" (" + strings.Join(attrs, ", ") + ")")
	}
	fmt.Fprintf(&b, " at offset %#x", s.Offset)
	return b.String()
}

// Signatures lists what wipefs(8) finds on the device at path, without
// changing it. A blank device has none (a nil slice and a nil error). If
// wipefs is not installed or fails, the error says so; the caller cannot
// then know the device is blank.
func Signatures(ctx context.Context, path string) ([]Signature, error) {
	cmd := exec.CommandContext(ctx, "wipefs", "--no-act", "--json", path)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// Untranslated messages, so that the error reads the same in logs and
	// bug reports whatever the daemon's locale.
	cmd.Env = append(cmd.Environ(), "LC_ALL=C")
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("devinfo: cannot check %s for existing data: wipefs: %w", path, ctx.Err())
		}
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("devinfo: cannot check %s for existing data: wipefs (util-linux) is not installed: %w", path, err)
		}
		msg := oneLine(stderr.String())
		if msg == "" {
			return nil, fmt.Errorf("devinfo: cannot check %s for existing data: wipefs: %w", path, err)
		}
		return nil, fmt.Errorf("devinfo: cannot check %s for existing data: wipefs: %w: %s", path, err, msg)
	}
	sigs, err := parseWipefs(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("devinfo: cannot check %s for existing data: %w", path, err)
	}
	return sigs, nil
}

// parseWipefs decodes the output of `wipefs --no-act --json`:
//
//	{"signatures": [{"device": "sig.img", "offset": "0x438", "type": "ext4",
//	                 "uuid": "ed76…", "label": null}]}
//
// Empty output is taken as no signatures too: older wipefs versions print
// no table at all when there is nothing to list.
func parseWipefs(out []byte) ([]Signature, error) {
	if len(bytes.TrimSpace(out)) == 0 {
		// wipefs --json prints an empty list for a blank device; saying
		// nothing is not saying the device is blank.
		return nil, errors.New("wipefs output: empty")
	}
	var doc struct {
		Signatures []struct {
			Offset string `json:"offset"`
			Type   string `json:"type"`
			UUID   string `json:"uuid"`  // null decodes to ""
			Label  string `json:"label"` // null decodes to ""
		} `json:"signatures"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("wipefs output: %w", err)
	}
	var sigs []Signature
	for _, s := range doc.Signatures {
		// Base 0 takes wipefs's "0x438" and a plain decimal alike.
		off, err := strconv.ParseInt(s.Offset, 0, 64)
		if err != nil {
			return nil, fmt.Errorf("wipefs output: %s signature: offset: %w", s.Type, err)
		}
		if s.Type == "" {
			return nil, fmt.Errorf("wipefs output: signature at offset %#x has no type", off)
		}
		sigs = append(sigs, Signature{Type: s.Type, Offset: off, UUID: s.UUID, Label: s.Label})
	}
	return sigs, nil
}

// oneLine joins the non-blank lines of s with "; ", for an error message.
func oneLine(s string) string {
	var lines []string
	for l := range strings.Lines(s) {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}
