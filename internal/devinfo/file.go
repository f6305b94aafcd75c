package devinfo

import (
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// fsIocGetVersion is FS_IOC_GETVERSION, _IOR('v', 1, long), which
// golang.org/x/sys/unix does not define. Its encoding differs between
// architectures (direction bits, sizeof(long)) exactly as that of
// FS_IOC_GETFLAGS, _IOR('f', 1, long), does, so it is derived from that by
// swapping the type byte rather than hard-coding the amd64 value.
const fsIocGetVersion = unix.FS_IOC_GETFLAGS&^0xff00 | 'v'<<8

// fileIdentity returns the identity of the regular file open on fd, whose
// fstat is st.
func fileIdentity(fd int, st *unix.Stat_t) (Identity, error) {
	keys := map[string]string{
		keyDev: devString(uint64(st.Dev)), // uint32 on some architectures
		keyIno: strconv.FormatUint(st.Ino, 10),
	}

	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return Identity{}, fmt.Errorf("fstatfs: %w", err)
	}
	// A zero fsid means the file system does not provide one; it would
	// make every such file system look the same.
	if sfs.Fsid.Val != [2]int32{} {
		keys[keyFsid] = fmt.Sprintf("%08x%08x", uint32(sfs.Fsid.Val[0]), uint32(sfs.Fsid.Val[1]))
	}

	var stx unix.Statx_t
	err := unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_STATX_SYNC_AS_STAT, unix.STATX_BTIME, &stx)
	switch {
	case err == nil:
		// The mask says whether this file system reports a birth time.
		if stx.Mask&unix.STATX_BTIME != 0 {
			ns := stx.Btime.Sec*1e9 + int64(stx.Btime.Nsec)
			keys[keyBtime] = strconv.FormatInt(ns, 10)
		}
	case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EPERM), errors.Is(err, unix.EINVAL):
		// A kernel before 4.11, or a seccomp filter that forbids statx:
		// there is no birth time to record, as on a file system without
		// one.
	default:
		return Identity{}, fmt.Errorf("statx: %w", err)
	}

	// Most file systems other than ext2/3/4, btrfs and xfs do not
	// implement FS_IOC_GETVERSION (ENOTTY, EINVAL, EOPNOTSUPP…); whatever
	// the error, there is then no generation to record.
	if gen, err := unix.IoctlGetUint32(fd, fsIocGetVersion); err == nil {
		keys[keyGen] = strconv.FormatUint(uint64(gen), 10)
	}

	return Identity{Kind: kindFile, Size: st.Size, Keys: keys}, nil
}

// devString formats a device number as "MAJ:MIN".
func devString(dev uint64) string {
	return fmt.Sprintf("%d:%d", unix.Major(dev), unix.Minor(dev))
}
