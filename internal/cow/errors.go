package cow

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors that an NBD client should see as a specific errno
// wrap the matching syscall.Errno as well, so that the NBD layer can map
// them with errors.Is.
var (
	// ErrClosed: the engine was closed.
	ErrClosed = fmt.Errorf("cow: engine closed: %w", syscall.ESHUTDOWN)
	// ErrCleared: the snapshot was cleared.
	ErrCleared = fmt.Errorf("cow: snapshot cleared: %w", syscall.ESHUTDOWN)
	// ErrInvalid: the snapshot is invalid (a store error or a full store);
	// reads fail with it. It wraps EIO.
	ErrInvalid = fmt.Errorf("cow: snapshot invalid: %w", syscall.EIO)
	// ErrBookmark: the snapshot is a bookmark, which keeps no image; reads
	// fail with it. It wraps ESHUTDOWN, as the image is gone like a
	// cleared snapshot's.
	ErrBookmark = fmt.Errorf("cow: snapshot is a bookmark, its image was dropped: %w", syscall.ESHUTDOWN)
	// ErrNoBase: changed blocks were asked against a snapshot that cannot
	// answer exactly (see dirty.go); nothing is reported rather than too
	// little.
	ErrNoBase = errors.New("cow: no exact changed blocks against that snapshot")
	// ErrRollback: a rollback is under way (rollback.go): snapshots cannot
	// be created, nor its snapshot cleared, until it is complete.
	ErrRollback = errors.New("cow: a rollback is under way")
	// ErrExists: a snapshot of that name exists.
	ErrExists = errors.New("cow: snapshot exists")
	// ErrNotFound: no snapshot of that name.
	ErrNotFound = errors.New("cow: no such snapshot")
	// ErrRange: a request outside the device. It wraps EINVAL.
	ErrRange = fmt.Errorf("cow: request out of range: %w", syscall.EINVAL)
	// ErrBadOption: an option is out of range. It wraps EINVAL.
	ErrBadOption = fmt.Errorf("cow: bad option: %w", syscall.EINVAL)
	// ErrOriginMismatch: Reopen was given a store of another origin.
	ErrOriginMismatch = errors.New("cow: store belongs to another origin")
	// ErrNotFast: ZeroFast cannot zero without copying or writing zeros.
	ErrNotFast = errors.New("cow: zero cannot be done fast")
	// ErrOriginResized: Reopen was given a store of this origin, taken when
	// the origin had another size; a snapshot cannot follow a resize.
	ErrOriginResized = errors.New("a snapshot cannot follow a resized origin")
)

// invalidError is returned by reads of an invalid snapshot: it carries the
// reason and matches ErrInvalid (and so syscall.EIO).
type invalidError struct{ reason string }

func (e *invalidError) Error() string { return "cow: snapshot invalid: " + e.reason }
func (e *invalidError) Unwrap() error { return ErrInvalid }
