package cli

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// FIFREEZE and FITHAW from linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int).
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// freezeFS freezes the filesystem mounted at mountpoint (the kernel flushes
// its dirty data and blocks new writes) and returns the function that thaws
// it. The caller must call thaw on every path, failure included: a
// filesystem left frozen hangs every writer on it.
func freezeFS(mountpoint string) (thaw func() error, err error) {
	f, err := os.Open(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("--freeze: %w", err)
	}
	if err := unix.IoctlSetInt(int(f.Fd()), ioctlFIFREEZE, 0); err != nil {
		f.Close()
		switch {
		case errors.Is(err, unix.EBUSY):
			return nil, fmt.Errorf("--freeze %s: filesystem is already frozen", mountpoint)
		case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTTY), errors.Is(err, unix.EINVAL):
			return nil, fmt.Errorf("--freeze %s: not a mountpoint of a filesystem that can freeze", mountpoint)
		case errors.Is(err, unix.EPERM):
			return nil, fmt.Errorf("--freeze %s: needs CAP_SYS_ADMIN (run as root)", mountpoint)
		}
		return nil, fmt.Errorf("--freeze %s: FIFREEZE: %w", mountpoint, err)
	}
	return func() error {
		defer f.Close()
		if err := unix.IoctlSetInt(int(f.Fd()), ioctlFITHAW, 0); err != nil {
			return fmt.Errorf("thaw %s: FITHAW: %w (run `fsfreeze -u %s`)", mountpoint, err, mountpoint)
		}
		return nil
	}, nil
}
