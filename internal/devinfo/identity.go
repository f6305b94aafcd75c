package devinfo

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"unicode"

	"golang.org/x/sys/unix"
)

// Kinds of identity.
const (
	kindFile  = "file"
	kindBlock = "block"
)

// Keys of a block device's identity. The structural keys say where on a
// disk the device is; they must be present on both sides or neither. Every
// other key of a block identity is a disk name, compared where both sides
// have it.
const (
	keyPart = "part"
	keyLoop = "loop"
)

// Keys of a regular file's identity.
const (
	keyDev   = "dev"
	keyFsid  = "fsid"
	keyIno   = "ino"
	keyBtime = "btime"
	keyGen   = "gen"
)

// Identity is the stable identity of a regular file or a block device.
//
// It is stored in JSON state records, so the field names and the meaning of
// each key are part of the state format.
type Identity struct {
	Kind string            `json:"kind"` // "file" or "block"
	Size int64             `json:"size"`
	Keys map[string]string `json:"keys,omitempty"`
}

// Of returns the identity of an open regular file or block device.
func Of(f *os.File) (Identity, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return Identity{}, fmt.Errorf("devinfo: %s: %w", f.Name(), err)
	}
	var id Identity
	// Control keeps f open while the system calls use its descriptor.
	cerr := rc.Control(func(fd uintptr) {
		id, err = identityOf(int(fd))
	})
	if cerr != nil {
		return Identity{}, fmt.Errorf("devinfo: %s: %w", f.Name(), cerr)
	}
	if err != nil {
		return Identity{}, fmt.Errorf("devinfo: %s: %w", f.Name(), err)
	}
	return id, nil
}

func identityOf(fd int) (Identity, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Identity{}, fmt.Errorf("fstat: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return fileIdentity(fd, &st)
	case unix.S_IFBLK:
		size, err := blockSize(fd)
		if err != nil {
			return Identity{}, err
		}
		keys, err := blockKeys("/sys", uint64(st.Rdev), func() (*unix.LoopInfo64, error) {
			return unix.IoctlLoopGetStatus64(fd)
		})
		if err != nil {
			return Identity{}, err
		}
		return Identity{Kind: kindBlock, Size: size, Keys: keys}, nil
	default:
		return Identity{}, fmt.Errorf("not a regular file or block device (mode %#o)", st.Mode&unix.S_IFMT)
	}
}

// String returns a deterministic one-line form: the kind, the size and the
// keys in sorted order, e.g. "block size=8589934592 serial=QM00001". Values
// holding spaces, quotes or '=' are quoted so the line stays parseable.
func (id Identity) String() string {
	var b strings.Builder
	b.WriteString(id.Kind)
	b.WriteString(" size=")
	b.WriteString(strconv.FormatInt(id.Size, 10))
	for _, k := range sortedKeys(id.Keys) {
		b.WriteByte(' ')
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(quoteValue(id.Keys[k]))
	}
	return b.String()
}

func quoteValue(v string) string {
	needs := func(r rune) bool { return r == ' ' || r == '"' || r == '=' || !unicode.IsPrint(r) }
	if v == "" || strings.ContainsFunc(v, needs) {
		return strconv.Quote(v)
	}
	return v
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Weak reports whether id names nothing beyond its kind and size (and, for
// a partition, its position on the disk): a block device whose disk has no
// kernel identifier and is not a loop device. A different device of the
// same size then matches it, so callers log a warning.
func (id Identity) Weak() bool {
	for k := range id.Keys {
		if id.Kind != kindBlock || k != keyPart {
			return false
		}
	}
	return true
}

// Match returns nil if current is the same file or device as recorded, and
// otherwise an error naming what differs, e.g.
// "devinfo: not the same block device: serial QM00001 != QM00002".
// The rules are in the package documentation.
func Match(recorded, current Identity) error {
	var diffs []string
	if recorded.Kind != current.Kind {
		diffs = append(diffs, fmt.Sprintf("kind %s != %s", recorded.Kind, current.Kind))
	} else {
		if recorded.Size != current.Size {
			diffs = append(diffs, fmt.Sprintf("size changed from %d to %d bytes", recorded.Size, current.Size))
		}
		switch recorded.Kind {
		case kindFile:
			diffs = append(diffs, fileDiffs(recorded.Keys, current.Keys)...)
		case kindBlock:
			diffs = append(diffs, blockDiffs(recorded.Keys, current.Keys)...)
		default:
			return fmt.Errorf("devinfo: unknown identity kind %q", recorded.Kind)
		}
	}
	if len(diffs) == 0 {
		return nil
	}
	what := "device"
	switch recorded.Kind {
	case kindFile:
		what = "file"
	case kindBlock:
		what = "block device"
	}
	if len(diffs) == 1 && recorded.Kind == current.Kind && recorded.Size != current.Size &&
		!recorded.Weak() && !current.Weak() {
		// Only the size differs, and the rest proves it is the same disk
		// or file: it was grown or shrunk. Saying "not the same" would send
		// the user looking for another. (An identity of size alone proves
		// nothing: that is another disk.)
		return &ResizedError{What: what, From: recorded.Size, To: current.Size}
	}
	return errors.New("devinfo: not the same " + what + ": " + strings.Join(diffs, ", "))
}

// ResizedError is Match's answer when the identities differ in size alone.
type ResizedError struct {
	What     string // "file" or "block device"
	From, To int64  // the recorded and the current size in bytes
}

func (e *ResizedError) Error() string {
	return fmt.Sprintf("devinfo: the same %s, but its size changed from %d to %d bytes", e.What, e.From, e.To)
}

// fileDiffs compares the keys of two regular files.
func fileDiffs(rec, cur map[string]string) []string {
	var diffs []string
	// The inode number is always recorded for a file; a missing one on
	// either side is a difference, not a pass.
	if rec[keyIno] != cur[keyIno] {
		diffs = append(diffs, differ(keyIno, rec, cur))
	}
	for _, k := range []string{keyBtime, keyGen} {
		if bothDiffer(k, rec, cur) {
			diffs = append(diffs, differ(k, rec, cur))
		}
	}
	sameFS := rec[keyDev] == cur[keyDev] ||
		rec[keyFsid] != "" && rec[keyFsid] == cur[keyFsid]
	if !sameFS {
		diffs = append(diffs, differ(keyDev, rec, cur))
		if rec[keyFsid] != "" || cur[keyFsid] != "" {
			diffs = append(diffs, differ(keyFsid, rec, cur))
		}
	}
	return diffs
}

// blockDiffs compares the keys of two block devices.
func blockDiffs(rec, cur map[string]string) []string {
	var diffs []string
	for _, k := range []string{keyPart, keyLoop} {
		if rec[k] != cur[k] {
			diffs = append(diffs, differ(k, rec, cur))
		}
	}
	var recNames []string
	shared := false
	for _, k := range sortedKeys(rec) {
		if k == keyPart || k == keyLoop {
			continue
		}
		recNames = append(recNames, k+"="+quoteValue(rec[k]))
		if _, ok := cur[k]; !ok {
			continue
		}
		shared = true
		if rec[k] != cur[k] {
			diffs = append(diffs, differ(k, rec, cur))
		}
	}
	// A disk that had a name and now has none in common may be any disk.
	if len(recNames) > 0 && !shared {
		diffs = append(diffs, fmt.Sprintf("no identifier in common (recorded %s)", strings.Join(recNames, " ")))
	}
	return diffs
}

// bothDiffer reports whether both sides have key k and its values differ.
func bothDiffer(k string, rec, cur map[string]string) bool {
	r, rok := rec[k]
	c, cok := cur[k]
	return rok && cok && r != c
}

// differ formats a difference of key k as "k RECORDED != CURRENT".
func differ(k string, rec, cur map[string]string) string {
	return k + " " + shown(rec, k) + " != " + shown(cur, k)
}

func shown(m map[string]string, k string) string {
	v, ok := m[k]
	if !ok {
		return "(none)"
	}
	return quoteValue(v)
}
