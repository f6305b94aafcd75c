package vfstest

import (
	"errors"
	"io"
	"os"
	"syscall"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// HoleBlock is the granularity of a MemFS file's holes.
const HoleBlock = 4096

var _ vfs.DataSeeker = (*memFile)(nil)

// SeekData implements vfs.DataSeeker. A MemFS file keeps no allocation map:
// every HoleBlock-aligned block that holds only zeros is a hole, as on a
// file system that stores no all-zero blocks (ZFS with compression, qcow2
// with zero detection). So a punched or never written range is a hole, and
// so is a block of written zeros; a block with any other byte is data. A
// simulated block device (CreateDevice) reports errors.ErrUnsupported, as
// the OS implementation does for a real one.
func (f *memFile) SeekData(off int64) (int64, error) {
	if err := f.checkSeek("lseek SEEK_DATA", off); err != nil {
		return 0, err
	}
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	b := f.n.cur
	for blk := off &^ (HoleBlock - 1); blk < int64(len(b)); blk += HoleBlock {
		if !zeroBlock(b, blk) {
			return max(off, blk), nil
		}
	}
	return 0, io.EOF
}

// SeekHole implements vfs.DataSeeker; see SeekData.
func (f *memFile) SeekHole(off int64) (int64, error) {
	if err := f.checkSeek("lseek SEEK_HOLE", off); err != nil {
		return 0, err
	}
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	b := f.n.cur
	if off >= int64(len(b)) {
		return 0, f.pathErr("lseek SEEK_HOLE", syscall.ENXIO)
	}
	for blk := off &^ (HoleBlock - 1); blk < int64(len(b)); blk += HoleBlock {
		if zeroBlock(b, blk) {
			return max(off, blk), nil
		}
	}
	return int64(len(b)), nil
}

func (f *memFile) checkSeek(op string, off int64) error {
	if f.closed.Load() {
		return f.pathErr(op, os.ErrClosed)
	}
	if off < 0 {
		return f.pathErr(op, syscall.EINVAL)
	}
	if f.n.devSize > 0 {
		return f.pathErr(op, errors.ErrUnsupported)
	}
	return nil
}

// zeroBlock reports whether the block at blk (within b) holds only zeros.
func zeroBlock(b []byte, blk int64) bool {
	for _, c := range b[blk:min(blk+HoleBlock, int64(len(b)))] {
		if c != 0 {
			return false
		}
	}
	return true
}
