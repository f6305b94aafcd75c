// Package vfstest holds the test implementations of the vfs interfaces.
//
// [MemFS] is an in-memory [vfs.FS] that remembers, for every file, what a
// crash would keep: the contents as of the last completed Sync, and the list
// of operations issued since. [MemFS.CrashClone] returns a new MemFS holding
// only the durable state, optionally plus a random (seeded, so replayable)
// subset of the unsynced operations, with writes possibly torn at sector
// granularity. [MemFS.CrashAt] takes such a clone immediately before the k-th
// mutating operation, so a test can loop k = 1, 2, … until the workload no
// longer reaches k (Pebble's crash loops).
//
// A MemFS file is a [vfs.DataSeeker] whose holes are its all-zero blocks
// of [HoleBlock] bytes (seek.go); the wrappers below do not pass that
// capability on, so a wrapped file is all data to its user.
//
// [FaultFS] wraps any [vfs.FS] (and [FaultFS.Wrap] any single [vfs.File]) and
// fails chosen operations with an errno (ENOSPC, EIO, …) returned as an
// *os.PathError, so errors.Is(err, syscall.ENOSPC) holds as it does for the
// real file system.
//
// [Stall] wraps a [vfs.File] so that, while it is held, writes and syncs
// block until resumed: a disk that stopped answering, for the code that
// must not wait for it forever.
//
// Concurrency: every type here is safe for concurrent use. Operations on one
// file are serialised by a per-file lock; a crash clone locks every file at
// once, so it captures a single instant across all files of the MemFS.
package vfstest
