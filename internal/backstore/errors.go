package backstore

import "errors"

// Sentinel errors. Functions wrap them with context; test with errors.Is.
// Their texts carry no "backstore:" prefix: every error the package returns
// gets it once, where it leaves the package, however many layers wrapped it.
var (
	// ErrNotStore: neither header slot holds a valid header (wrong magic or
	// both checksums fail) — the file is not a store, or both headers are
	// destroyed.
	ErrNotStore = errors.New("not a backing store")
	// ErrVersion: the store was written by a newer format version than this
	// program understands. Nothing is changed.
	ErrVersion = errors.New("unsupported format version")
	// ErrTransient: Open of a transient store, which keeps no map on disk
	// and so cannot be reopened.
	ErrTransient = errors.New("transient store cannot be reopened")
	// ErrCorrupt: the metadata contradicts itself in a way no crash can
	// produce (a cluster claimed twice, a committed block missing, …).
	ErrCorrupt = errors.New("store is corrupt")
	// ErrFull: the store has no room for the batch (MaxSize, the end of a
	// block device, or ENOSPC from the file system, which it then also
	// wraps).
	ErrFull = errors.New("store is full")
	// ErrFailed: an earlier Commit failed with an I/O error; what it wrote
	// may or may not be durable, so the store takes no further batches.
	// Reopening it recovers the last committed state.
	ErrFailed = errors.New("store failed earlier")
	// ErrInvalid: the store is marked invalid and takes no further batches.
	ErrInvalid = errors.New("snapshot is invalid")
	// ErrClosed: the store is closed.
	ErrClosed = errors.New("store is closed")
	// ErrBadCluster: a batch names a cluster out of range, already copied,
	// twice, or with data of the wrong length. Nothing is written.
	ErrBadCluster = errors.New("bad cluster in batch")
	// ErrBookmark: the store is a bookmark, which holds no data.
	ErrBookmark = errors.New("store is a bookmark: its data was dropped")
	// ErrChecksum: a cluster read from the store does not match the
	// checksum recorded when it was committed: the store was damaged.
	ErrChecksum = errors.New("cluster fails its checksum")
	// ErrOtherStore: the file holds a store, but not the one asked for
	// (its UUID differs).
	ErrOtherStore = errors.New("another store")
	// ErrNoProgress: a rollback progress file whose rollback was never
	// committed (a crash came before its header was durable).
	ErrNoProgress = errors.New("no rollback committed in the progress file")
	// ErrOptions: Create was given options it cannot honour.
	ErrOptions = errors.New("bad options")
)
