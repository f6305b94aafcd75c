package vfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// OS is the FS of the running system.
type OS struct{}

// OpenFile opens a regular file or a block device. When the call creates the
// file, the parent directory is synced so that the creation is durable.
func (OS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	_, statErr := os.Stat(name)
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	if flag&os.O_CREATE != 0 && os.IsNotExist(statErr) {
		if err := syncDir(filepath.Dir(name)); err != nil {
			f.Close()
			return nil, err
		}
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &osFile{f: f, blockDev: fi.Mode()&os.ModeDevice != 0}, nil
}

// Remove removes name and syncs its directory.
func (OS) Remove(name string) error {
	if err := os.Remove(name); err != nil {
		return err
	}
	return syncDir(filepath.Dir(name))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// NewOSFile wraps an already open *os.File (for example a block device the
// caller opened with O_EXCL).
func NewOSFile(f *os.File) (File, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return &osFile{f: f, blockDev: fi.Mode()&os.ModeDevice != 0}, nil
}

type osFile struct {
	f        *os.File
	blockDev bool
}

func (o *osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o *osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }
func (o *osFile) Close() error                             { return o.f.Close() }

func (o *osFile) Sync() error {
	if err := unix.Fdatasync(int(o.f.Fd())); err != nil {
		return &os.PathError{Op: "fdatasync", Path: o.f.Name(), Err: err}
	}
	return nil
}

func (o *osFile) Size() (int64, error) {
	if o.blockDev {
		var r [2]uint64
		if err := ioctlPtr(o.f.Fd(), unix.BLKGETSIZE64, &r); err != nil {
			return 0, &os.PathError{Op: "BLKGETSIZE64", Path: o.f.Name(), Err: err}
		}
		return int64(r[0]), nil
	}
	fi, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (o *osFile) Truncate(size int64) error {
	if o.blockDev {
		return &os.PathError{Op: "truncate", Path: o.f.Name(), Err: unix.EINVAL}
	}
	return o.f.Truncate(size)
}

// StartWriteback starts writing the range's dirty pages back, without
// waiting for them (a block device's page cache too).
func (o *osFile) StartWriteback(off, length int64) error {
	if err := unix.SyncFileRange(int(o.f.Fd()), off, length, unix.SYNC_FILE_RANGE_WRITE); err != nil {
		return &os.PathError{Op: "sync_file_range", Path: o.f.Name(), Err: err}
	}
	return nil
}

// Deallocate punches a hole in a regular file. On a block device it issues
// BLKZEROOUT, because BLKDISCARD does not promise that the range reads back
// as zeros and callers rely on that.
func (o *osFile) Deallocate(off, length int64) error {
	if o.blockDev {
		return o.blkZeroOut(off, length)
	}
	err := unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil {
		return &os.PathError{Op: "fallocate punch-hole", Path: o.f.Name(), Err: err}
	}
	return nil
}

// ZeroRange zeroes a range without writing the zeros.
func (o *osFile) ZeroRange(off, length int64) error {
	if o.blockDev {
		return o.blkZeroOut(off, length)
	}
	err := unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil {
		return &os.PathError{Op: "fallocate zero-range", Path: o.f.Name(), Err: err}
	}
	return nil
}

// FastZeroRange zeroes a range of a regular file by changing its extents:
// fallocate ZERO_RANGE (which keeps the range allocated), or, where the file
// system has no ZERO_RANGE (tmpfs) and a hole is allowed, PUNCH_HOLE. Both
// fail with EOPNOTSUPP rather than write zeros. A block device is refused:
// BLKZEROOUT, and fallocate on a device, may write the zeros in the kernel.
func (o *osFile) FastZeroRange(off, length int64, noHole bool) error {
	if o.blockDev {
		return fmt.Errorf("fast zero on block device %s: %w", o.f.Name(), errors.ErrUnsupported)
	}
	fd := int(o.f.Fd())
	err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) && !noHole {
		err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("fast zero on %s: %w: %w", o.f.Name(), errors.ErrUnsupported, err)
	case err != nil:
		return &os.PathError{Op: "fallocate zero", Path: o.f.Name(), Err: err}
	}
	return nil
}

func (o *osFile) blkZeroOut(off, length int64) error {
	r := [2]uint64{uint64(off), uint64(length)}
	if err := ioctlPtr(o.f.Fd(), unix.BLKZEROOUT, &r); err != nil {
		return &os.PathError{Op: "BLKZEROOUT", Path: o.f.Name(), Err: err}
	}
	return nil
}

// SeekData implements DataSeeker with lseek(2) SEEK_DATA. lseek moves the
// descriptor's file offset, which nothing here uses (reads and writes are
// pread and pwrite), so concurrent calls need no lock.
//
// A block device reports errors.ErrUnsupported. Linux answers SEEK_DATA
// on a block device as if all of it were data, even where the device is
// thin-provisioned (dm-thin, LVM thin pools) and knows which blocks are
// unmapped, since no lseek or generic ioctl reports that; the error says
// "all data" without the system call.
func (o *osFile) SeekData(off int64) (int64, error) {
	return o.seek(off, unix.SEEK_DATA, "lseek SEEK_DATA")
}

// SeekHole implements DataSeeker with lseek(2) SEEK_HOLE; see SeekData.
func (o *osFile) SeekHole(off int64) (int64, error) {
	return o.seek(off, unix.SEEK_HOLE, "lseek SEEK_HOLE")
}

func (o *osFile) seek(off int64, whence int, op string) (int64, error) {
	if o.blockDev {
		return 0, fmt.Errorf("%s on block device %s: %w", op, o.f.Name(), errors.ErrUnsupported)
	}
	n, err := unix.Seek(int(o.f.Fd()), off, whence)
	switch {
	case errors.Is(err, unix.ENXIO) && whence == unix.SEEK_DATA:
		// No data at or after off (or off at or past the end).
		return 0, io.EOF
	case err != nil:
		return 0, &os.PathError{Op: op, Path: o.f.Name(), Err: err}
	}
	return n, nil
}
