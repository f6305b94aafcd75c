package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nbdsnap/nbdsnap/internal/cow"
)

// DefaultHeldBytes is the default size of the held-writes log: the most
// the payloads of held writes may take (cow's held.go).
const DefaultHeldBytes int64 = 64 << 20

// bootIDPath names this boot of the kernel.
const bootIDPath = "/proc/sys/kernel/random/boot_id"

// heldLogPath is the held-writes log's path: next to the control socket,
// which lives on tmpfs (/run/nbdsnap) unless --control says otherwise.
func heldLogPath(control, name string) string {
	return filepath.Join(filepath.Dir(control), name+".held")
}

// heldLogTag ties the log to this boot and this origin: a log of another
// boot is not replayed (its writes, never flushed, went with the page
// cache of that boot, as the origin's own unflushed writes did), nor one
// of another origin.
func heldLogTag(ident string) (string, error) {
	b, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(ident))
	return strings.TrimSpace(string(b)) + ":" + hex.EncodeToString(sum[:13]), nil
}

// replayHeld writes to the origin, through copy-on-write, the writes a
// killed daemon answered and left in the held-writes log, flushes them,
// and gives the engine a fresh log (none with --held-size 0). It runs once
// the snapshots are settled and before the origin is served. A log that
// cannot be read stops the start: it may hold answered writes.
func (d *Daemon) replayHeld(ctx context.Context) error {
	path := heldLogPath(d.cfg.Control, d.cfg.Name)
	tag, err := heldLogTag(d.ident.String())
	if err != nil {
		// Without the boot's identity a log cannot be told from one of
		// an earlier boot: writes are not held, and none were before.
		d.log.Warn("writes are not held: this boot cannot be identified", "err", err)
		return nil
	}
	recs, err := cow.ReadHeldLog(path, tag)
	var other *cow.OtherTagError
	if errors.As(err, &other) {
		// Not replayed: of an earlier boot, its writes went with that
		// boot's page cache, as the origin's own unflushed writes did; of
		// another origin identity (the origin moved, --accept-moved-origin),
		// they cannot be told to belong to this one.
		bootNow, _, _ := strings.Cut(tag, ":")
		if bootThen, _, _ := strings.Cut(other.Tag, ":"); bootThen == bootNow {
			d.log.Warn("the held-writes log a killed daemon left is of another origin identity: its writes are not replayed and are lost",
				"log", path, "tag", other.Tag)
		} else {
			d.log.Info("the held-writes log is of an earlier boot: not replayed", "log", path)
		}
		recs, err = nil, nil
	}
	if errors.Is(err, cow.ErrNotHeldLog) {
		return fmt.Errorf("%s is in the way of the held-writes log: %w; it is left as it is (move it, or give --control another directory)", path, err)
	}
	if err != nil {
		return fmt.Errorf("held-writes log %s: %w: the origin is not served, since the log may hold writes a killed daemon answered; move it aside only if you accept losing them", path, err)
	}
	for _, r := range recs {
		if r.Off+int64(len(r.Data)) > d.engine.Size() {
			return fmt.Errorf("held-writes log %s: a write of %d bytes at %d is beyond the origin's %d bytes: %w",
				path, len(r.Data), r.Off, d.engine.Size(), cow.ErrHeldLogDamaged)
		}
		if err := d.engine.WriteAt(ctx, r.Data, r.Off, false); err != nil {
			return fmt.Errorf("replay the held-writes log %s: %w", path, err)
		}
	}
	if len(recs) > 0 {
		if err := d.engine.Flush(ctx); err != nil {
			return fmt.Errorf("replay the held-writes log %s: %w", path, err)
		}
		d.log.Warn("replayed the writes a killed daemon had answered and not yet written to the origin", "writes", len(recs), "log", path)
	}
	if d.cfg.HeldBytes < 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("held-writes log: %w", err)
		}
		return nil
	}
	size := DefaultHeldBytes
	if d.cfg.HeldBytes > 0 {
		size = max(cow.MinHeldLogSize, d.cfg.HeldBytes&^63)
	}
	l, err := cow.CreateHeldLog(path, size, tag)
	if err != nil {
		return err
	}
	d.heldLog = l
	d.engine.UseHeldLog(l)
	return nil
}
