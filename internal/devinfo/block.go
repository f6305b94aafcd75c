package devinfo

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// blockKeys returns the identity keys of the block device whose device
// number is rdev, read from the sysfs tree at sysRoot ("/sys" but for
// tests). loopStatus is called only for a loop device, to read the status
// of its backing file; tests stub it.
func blockKeys(sysRoot string, rdev uint64, loopStatus func() (*unix.LoopInfo64, error)) (map[string]string, error) {
	link := filepath.Join(sysRoot, "dev", "block", devString(rdev))
	// Resolve the symlink before going to the parent: filepath.Join(link,
	// "..") would clean lexically to sysRoot/dev/block, not the disk.
	dir, err := filepath.EvalSymlinks(link)
	if err != nil {
		return nil, fmt.Errorf("find block device %s in sysfs: %w", devString(rdev), err)
	}

	keys := make(map[string]string)
	disk := dir
	number, ok, err := readAttr(filepath.Join(dir, "partition"))
	if err != nil {
		return nil, err
	}
	if ok {
		start, ok, err := readAttr(filepath.Join(dir, "start"))
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("partition %s has no start in sysfs", dir)
		}
		keys[keyPart] = number + "@" + start
		disk = filepath.Dir(dir)
	}

	// The disk-name keys and the sysfs files, relative to the disk's
	// directory, they are read from; the first non-empty one wins. An nvme
	// device/serial is the controller's, shared by its namespaces; their
	// wwid tells them apart.
	diskNames := []struct {
		key   string
		files []string
	}{
		{"wwid", []string{"wwid", "device/wwid"}},       // nvme namespace; scsi VPD page 0x83
		{"serial", []string{"serial", "device/serial"}}, // virtio-blk; nvme, mmc
		{"dm.uuid", []string{"dm/uuid"}},
		{"md.uuid", []string{"md/uuid"}},
	}
	for _, n := range diskNames {
		for _, f := range n.files {
			v, ok, err := readAttr(filepath.Join(disk, f))
			if err != nil {
				return nil, err
			}
			if ok && v != "" {
				keys[n.key] = v
				break
			}
		}
	}

	if _, err := os.Stat(filepath.Join(disk, "loop")); err == nil {
		info, err := loopStatus()
		if errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("loop device has no backing file: %w", err)
		}
		if err != nil {
			return nil, fmt.Errorf("loop device status: %w", err)
		}
		// The backing file's st_dev as the kernel encodes it
		// (huge_encode_dev) is the same encoding as userspace's dev_t.
		keys[keyLoop] = fmt.Sprintf("dev=%s ino=%d offset=%d sizelimit=%d",
			devString(info.Device), info.Inode, info.Offset, info.Sizelimit)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("sysfs: %w", err)
	}

	if len(keys) == 0 {
		return nil, nil
	}
	return keys, nil
}

// readAttr reads a sysfs attribute and trims the white space around it. ok
// is false when the attribute does not exist, or when it exists but its
// read fails: sysfs attributes report "this device has no such value" that
// way (a SCSI disk without VPD page 0x83 returns EINVAL for wwid). Failing
// to open an existing attribute is an error.
func readAttr(path string) (value string, ok bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("sysfs: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return "", false, nil
	}
	return strings.TrimSpace(string(b)), true, nil
}

// blockSize returns the size in bytes of the block device open on fd.
func blockSize(fd int) (int64, error) {
	// golang.org/x/sys/unix has no IoctlGetUint64, and BLKGETSIZE64
	// writes a u64.
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", errno)
	}
	return int64(size), nil
}
