package cli

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// FIFREEZE and FITHAW from linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int).
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// checkFreeze refuses a --freeze that would do harm, before anything is
// frozen. FIFREEZE freezes the filesystem of whatever file it is given, so
// a path that is not a mountpoint would silently freeze the filesystem it
// lives on (often /). And a backing store or state directory on the frozen
// filesystem would make the daemon's create block on the freeze that waits
// for the create.
func checkFreeze(mountpoint string, mountinfo io.Reader, others map[string]string) (string, error) {
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return "", fmt.Errorf("--freeze: %w", err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("--freeze: %w", err)
	}
	mps, err := mountpoints(mountinfo)
	if err != nil {
		return "", fmt.Errorf("--freeze: %w", err)
	}
	if !mps[real] {
		return "", fmt.Errorf("--freeze %s: not a mountpoint", mountpoint)
	}
	var fs unix.Stat_t
	if err := unix.Stat(real, &fs); err != nil {
		return "", fmt.Errorf("--freeze %s: %w", mountpoint, err)
	}
	for what, p := range others {
		var st unix.Stat_t
		if p == "" || unix.Stat(p, &st) != nil {
			continue
		}
		if st.Dev == fs.Dev {
			return "", fmt.Errorf("--freeze %s: the %s %s is on the filesystem to freeze; the create would wait for itself", mountpoint, what, p)
		}
	}
	return real, nil
}

// mountpoints returns the mount points listed in a /proc/self/mountinfo.
func mountpoints(r io.Reader) (map[string]bool, error) {
	m := map[string]bool{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		m[unescapeMountinfo(f[4])] = true
	}
	return m, sc.Err()
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

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
			return nil, fmt.Errorf("--freeze %s: this filesystem cannot be frozen", mountpoint)
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
