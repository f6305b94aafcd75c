// Package vfs is the small file interface that the copy-on-write engine and
// the backing store do all their I/O through.
//
// Production code uses [OS]; tests substitute an in-memory file system that
// can simulate a crash (dropping every write not covered by a completed Sync)
// or inject faults (ENOSPC, EIO) at chosen operations. Keeping the interface
// this small is what makes those substitutes cheap to write and to trust.
//
// Durability contract: data written with WriteAt is durable once a later Sync
// on the same File has returned nil. Nothing else makes data durable, and
// nothing orders two writes that are not separated by a Sync. Creating or
// removing a file is treated as durable when the call returns (the OS
// implementation fsyncs the parent directory to make that true).
package vfs

import (
	"io"
	"os"
)

// File is an open file or block device.
type File interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed WriteAt durable (fdatasync).
	Sync() error
	// Size reports the current size in bytes (a block device's capacity).
	Size() (int64, error)
	// Truncate changes the size of a regular file. Block devices return an
	// error.
	Truncate(size int64) error
	Close() error
}

// Deallocator is implemented by files that can discard a range so that later
// reads return zeros (fallocate PUNCH_HOLE, BLKDISCARD with zeroing). Callers
// that need the range to read back as zeros and get an error fall back to
// writing zeros.
type Deallocator interface {
	Deallocate(off, length int64) error
}

// Zeroer is implemented by files that can zero a range without transferring
// the zeros (fallocate ZERO_RANGE, BLKZEROOUT).
type Zeroer interface {
	ZeroRange(off, length int64) error
}

// FastZeroer is implemented by files that may zero a range in a time that
// does not grow with its length. FastZeroRange either does that or fails
// with an error matching errors.ErrUnsupported having changed nothing; it
// never falls back to writing zeros. With noHole the range stays allocated.
type FastZeroer interface {
	FastZeroRange(off, length int64, noHole bool) error
}

// WriteBehinder is implemented by files that can start writing a range back
// to their device without waiting for it (sync_file_range
// SYNC_FILE_RANGE_WRITE). It is a hint and makes nothing durable: only Sync
// does. Its use is to let the device work while the caller goes on writing,
// so that the Sync that follows finds less to do.
type WriteBehinder interface {
	StartWriteback(off, length int64) error
}

// DataSeeker is implemented by files that know where their holes are, as
// lseek(2) SEEK_DATA and SEEK_HOLE tell on a regular file. A hole reads as
// zeros and holds no storage; a file system may report a hole as data
// (some cannot tell them apart), never data as a hole. An answer describes
// the file at one moment and may be out of date at once if the file is
// modified meanwhile. A file that cannot tell at all (a block device)
// fails both methods with an error matching errors.ErrUnsupported, and
// callers then take all of it for data.
type DataSeeker interface {
	// SeekData returns the offset of the first byte of data at or after
	// off, or io.EOF if there is none before the end of the file.
	SeekData(off int64) (int64, error)
	// SeekHole returns the offset of the first hole at or after off, which
	// must lie inside the file; the end of the file counts as a hole.
	SeekHole(off int64) (int64, error)
}

// FS opens and removes files by name.
type FS interface {
	// OpenFile opens name with os.OpenFile flags and permissions.
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	// Remove removes name.
	Remove(name string) error
}
