package daemon

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// openOrigin opens the origin read-write and makes sure nobody else writes
// it behind the engine's back: a snapshot is only bit-exact if every write
// to the origin passes through the copy-on-write engine.
//
// A block device is opened with O_EXCL, which Linux grants only if the
// device is not mounted, not part of a RAID/LVM, and not opened with O_EXCL
// by anyone else; while we hold it, mount(2) of it fails with EBUSY. A
// regular file has no such kernel protection: we take an exclusive flock so
// that at least a second nbdsnap (and any tool that honours flock) is
// refused. The lock lives as long as the file descriptor.
func openOrigin(path string) (*os.File, vfs.File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("origin %s does not exist", path)
		}
		return nil, nil, fmt.Errorf("origin: %w", err)
	}
	var f *os.File
	switch {
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		f, err = os.OpenFile(path, os.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EBUSY) {
			return nil, nil, fmt.Errorf("origin %s is in use (mounted, or opened exclusively by another program)", path)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("origin: %w", err)
		}
	case fi.Mode().IsRegular():
		f, err = os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("origin: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, nil, fmt.Errorf("origin %s is in use (locked by another nbdsnap daemon or program)", path)
			}
			return nil, nil, fmt.Errorf("origin: lock %s: %w", path, err)
		}
	default:
		return nil, nil, fmt.Errorf("origin %s is neither a block device nor a regular file", path)
	}
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("origin: %w", err)
	}
	size, err := vf.Size()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("origin: size of %s: %w", path, err)
	}
	if size == 0 {
		f.Close()
		return nil, nil, fmt.Errorf("origin %s is empty", path)
	}
	return f, vf, nil
}
