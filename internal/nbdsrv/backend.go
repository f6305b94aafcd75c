package nbdsrv

import (
	"context"
	"errors"
	"syscall"
)

// Backend is what an export serves. ReadAt is the only required method:
// it fills all of p from offset off or returns an error. The server never
// calls it with a range outside the export, and calls it concurrently.
//
// A call may run on the goroutine that reads the connection's requests
// (while the backend answers fast, see inline.go), so no call may wait
// for a later request of the same connection; waiting for anything else
// only delays that connection's next requests until the server notices
// the backend is slow.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// Optional capabilities, discovered by type assertion on the Backend. Each one
// turns on its transmission flag. All are called concurrently.
type (
	// Writer makes the export writable (unless Export.ReadOnly). fua asks
	// that the data be durable before WriteAt returns. p must not be
	// modified or kept after WriteAt returns: it is a pooled or shared
	// buffer.
	Writer interface {
		WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	}
	// Flusher makes every completed write durable (NBD_CMD_FLUSH).
	Flusher interface {
		Flush(ctx context.Context) error
	}
	// Trimmer discards a range (NBD_CMD_TRIM); what it reads back as
	// afterwards is unspecified by NBD.
	Trimmer interface {
		Trim(ctx context.Context, off, length int64, fua bool) error
	}
	// Zeroer zeroes a range without a data transfer (NBD_CMD_WRITE_ZEROES).
	// With flags.Fast it must return ErrNotFast, without doing anything,
	// when it cannot zero faster than writing zeros. A writable backend
	// without Zeroer still gets WRITE_ZEROES: the server writes zeros.
	Zeroer interface {
		Zero(ctx context.Context, off, length int64, flags ZeroFlags) error
	}
	// Cacher prefetches a range (NBD_CMD_CACHE).
	Cacher interface {
		Cache(ctx context.Context, off, length int64) error
	}
	// Extenter answers base:allocation block status queries. Without it
	// the whole export is reported as allocated data.
	Extenter interface {
		Extents(ctx context.Context, off, length int64) ([]Extent, error)
	}
)

// MetaContext is a further metadata context an export offers besides
// base:allocation (Export.MetaContexts), for example a changed-block bitmap
// named "qemu:dirty-bitmap:NAME" (flag ExtentDirty). A connection that
// selected it keeps calling it after it left the export's list, so once
// what it describes is gone, Extents should fail.
type MetaContext interface {
	// Name is the full context name, "namespace:leaf"; it must not change.
	Name() string
	// Extents describes the range starting at off. It is called
	// concurrently.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// Extent is one run of an Extents answer. Extents returns consecutive runs
// starting at the queried offset; they may cover less than the queried
// length (the client asks again) or more (the server clips), but the first
// must have a positive Length. Flags are the context's status bits
// (ExtentHole|ExtentZero for base:allocation).
type Extent struct {
	Length int64
	Flags  uint32
}

// ZeroFlags qualify a Zero call.
type ZeroFlags struct {
	NoHole bool // the range must stay allocated (no hole may be punched)
	Fast   bool // fail with ErrNotFast unless zeroing is faster than writing
	FUA    bool // durable before returning
}

// errnoOf maps a backend error to the NBD errno the client sees. The real
// error is logged before this lossy value is sent.
func errnoOf(err error) Errno {
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrNotFast):
		return ENOTSUP
	case errors.As(err, &en):
		switch en {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return EPERM
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.ENOTSUP:
			return ENOTSUP
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
		return EIO
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return ESHUTDOWN
	}
	return EIO
}
