// Package daemon wires one origin into a running nbdsnap daemon: it opens
// the origin (a block device exclusively, a regular file under flock),
// builds the copy-on-write engine (internal/cow) and the NBD server
// (internal/nbdsrv), serves the origin read-write under the daemon's name
// and each snapshot read-only under its own, and answers the control API
// (internal/control) on a unix socket. Tests start it in-process with
// [Start] and stop it with [Daemon.Shutdown]; `nbdsnap serve` does the same.
//
// Persistence: with a state directory every snapshot is recorded there
// (state.go) and a restarted daemon reopens the persistent ones. A
// transient snapshot, or one whose store cannot be reopened, is listed as
// invalid with the reason and never served.
//
// Concurrency: Create and Clear are serialised by one mutex (opMu); the
// snapshot table has its own short-held mutex so that Status answers while a
// Create is under way. The engine and the server are safe for concurrent
// use on their own.
//
// Caveats: a regular-file origin is protected by flock only, which other
// programs may ignore; nothing can detect an origin written while the
// daemon was not running, after which reopened snapshots are wrong.
package daemon
