// Package daemon wires one origin into a running nbdsnap daemon: it opens
// the origin (a block device exclusively, a regular file under flock),
// builds the copy-on-write engine (internal/cow) and the NBD server
// (internal/nbdsrv), serves the origin read-write under the daemon's name
// and each snapshot read-only under its own, and answers the control API
// (internal/control) on a unix socket. Tests start it in-process with
// [Start] and stop it with [Daemon.Shutdown]; `nbdsnap serve` does the same.
//
// Persistence: every snapshot is recorded in the state directory
// (state.go: phase, store UUID, origin identity, session). A restart
// settles every record before the origin takes a write (restart.go):
// reopens and serves what provably may be served, rolls back or finishes a
// create or clear a crash interrupted, and records durably as invalid any
// snapshot the origin would be served without. Backing stores are touched
// only after their header proved, by its UUID, that they are the
// snapshot's (backing.go). The design and its one residual case are in
// docs/design/2026-11-24-lifecycle.md.
//
// Rollback (rollback.go): the origin shows a snapshot's image from the
// moment the engine's rollback instant is durable in the state directory's
// progress file; a restart resumes it before serving the origin, or does
// not start if the snapshot's store cannot be reopened.
//
// Network: the NBD listeners may offer or require TLS, and allow-lists
// limit the origin's and the snapshots' exports to named client
// certificates (tls.go, and docs/design/2026-11-24-tls.md); a unix socket
// never requires TLS.
//
// Stopping: [Daemon.Shutdown] drains and closes cleanly until its context
// ends (--stop-timeout); then it gives up on the backing stores that have
// not caught up, invalidating their snapshots in their records before the
// origin writes waiting for them go on, and returns within a second with an
// error matching [ErrStopForced], even if goroutines are stuck in store
// calls (stop.go).
//
// Metrics and space: with Config.MetricsListen, /metrics serves a
// registry of the daemon's own (metrics.go): request counters fed by
// nbdsrv's Config.Observe, and a collector that reads the engine's Info at
// scrape time. A watch (space.go) checks every store against its max size
// and its file system's free space every few seconds and logs each
// threshold crossing once.
//
// Concurrency: Create and Clear are serialised by a one-token lock (ops),
// which a create whose client went away stops waiting for; the snapshot
// table has its own short-held mutex so that Status answers while a Create
// is under way. The engine and the server are safe for concurrent use on
// their own.
//
// Caveats: a regular-file origin is protected by flock only, which other
// programs may ignore; nothing can detect an origin written while the
// daemon was not running, after which reopened snapshots are wrong.
package daemon
