// Package filebackend serves a regular file through nbdsrv: reads and writes
// with pread/pwrite, flush with fdatasync, trim with a punched hole, write
// zeroes with FALLOC_FL_ZERO_RANGE (or a punched hole when holes are
// allowed), cache with posix_fadvise, and base:allocation from
// SEEK_DATA/SEEK_HOLE. The tests and the benchmark server use it; it is
// also the reference for what a backend implements.
package filebackend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// File is an nbdsrv backend over an open file. All methods are safe for
// concurrent use (they are positioned I/O on one descriptor).
type File struct {
	f *os.File
	// Latency is added to every request, to model a slow backend in
	// benchmarks. Zero in normal use.
	Latency time.Duration
}

// Open opens path for serving; readOnly opens it O_RDONLY.
func Open(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("filebackend: %w", err)
	}
	return &File{f: f}, nil
}

// Size is the file's current size.
func (b *File) Size() (int64, error) {
	fi, err := b.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("filebackend: %w", err)
	}
	return fi.Size(), nil
}

// Close closes the file.
func (b *File) Close() error { return b.f.Close() }

func (b *File) delay(ctx context.Context) error {
	if b.Latency <= 0 {
		return nil
	}
	t := time.NewTimer(b.Latency)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ReadAt fills p from off.
func (b *File) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := b.delay(ctx); err != nil {
		return err
	}
	n, err := b.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = errors.New("short read")
	}
	return fmt.Errorf("filebackend: read %d at %d: %w", len(p), off, err)
}

// WriteAt writes p at off, then fdatasyncs if fua.
func (b *File) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := b.delay(ctx); err != nil {
		return err
	}
	if _, err := b.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("filebackend: %w", err)
	}
	if fua {
		return b.sync()
	}
	return nil
}

func (b *File) sync() error {
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("filebackend: fdatasync: %w", err)
	}
	return nil
}

// Flush makes every completed write durable. One fdatasync covers writes
// made through every connection, which is what makes CAN_MULTI_CONN true
// for this backend.
func (b *File) Flush(ctx context.Context) error {
	if err := b.delay(ctx); err != nil {
		return err
	}
	return b.sync()
}

// Trim punches a hole.
func (b *File) Trim(ctx context.Context, off, length int64, fua bool) error {
	if err := b.delay(ctx); err != nil {
		return err
	}
	if err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
		return fmt.Errorf("filebackend: punch hole: %w", err)
	}
	if fua {
		return b.sync()
	}
	return nil
}

// Zero zeroes a range: a punched hole when holes are allowed, else
// FALLOC_FL_ZERO_RANGE. Both are fast; if the file system supports
// neither, a fast zero fails with nbdsrv.ErrNotFast and a normal one
// writes zeros.
func (b *File) Zero(ctx context.Context, off, length int64, flags nbdsrv.ZeroFlags) error {
	if err := b.delay(ctx); err != nil {
		return err
	}
	fd := int(b.f.Fd())
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if !flags.NoHole {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(fd, mode, off, length)
	if err != nil && !flags.NoHole {
		err = unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	if err != nil {
		if flags.Fast {
			return nbdsrv.ErrNotFast
		}
		if err := b.writeZeros(off, length); err != nil {
			return err
		}
	}
	if flags.FUA {
		return b.sync()
	}
	return nil
}

func (b *File) writeZeros(off, length int64) error {
	z := make([]byte, min(length, 1<<20))
	for length > 0 {
		k := min(length, int64(len(z)))
		if _, err := b.f.WriteAt(z[:k], off); err != nil {
			return fmt.Errorf("filebackend: write zeros: %w", err)
		}
		off, length = off+k, length-k
	}
	return nil
}

// Cache asks the kernel to read the range ahead (posix_fadvise WILLNEED).
func (b *File) Cache(ctx context.Context, off, length int64) error {
	if err := unix.Fadvise(int(b.f.Fd()), off, length, unix.FADV_WILLNEED); err != nil {
		return fmt.Errorf("filebackend: fadvise: %w", err)
	}
	return nil
}

// Extents reports data and holes with SEEK_DATA/SEEK_HOLE. A hole reads as
// zeros, so it is ExtentHole|ExtentZero.
func (b *File) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	fd := int(b.f.Fd())
	end := off + length
	var out []nbdsrv.Extent
	for off < end && len(out) < 1024 {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end // no data after off: hole to the end
		} else if err != nil {
			return nil, fmt.Errorf("filebackend: SEEK_DATA: %w", err)
		}
		if data > off {
			h := min(data, end) - off
			out = append(out, nbdsrv.Extent{Length: h, Flags: nbdsrv.ExtentHole | nbdsrv.ExtentZero})
			off += h
			continue
		}
		hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("filebackend: SEEK_HOLE: %w", err)
		}
		d := min(hole, end) - off
		if d <= 0 {
			break
		}
		out = append(out, nbdsrv.Extent{Length: d})
		off += d
	}
	return out, nil
}
