// Package control is the API between the nbdsnap CLI and a running daemon:
// HTTP with JSON bodies over the daemon's unix control socket, the shape
// dockerd and tailscaled use. It holds the wire types ([Status],
// [SnapshotInfo], [CreateRequest], [ErrorBody]), the server side ([Handler],
// which serves any [Service]) and the client ([Client]).
//
// Every path is versioned (/v1/...). Every response carries the daemon's
// build version in [HeaderVersion] and the API version in [HeaderAPI]; the
// client refuses to talk to a socket whose API version differs from its own,
// so that an old CLI never misreads a newer daemon's answers.
//
// Errors travel as a JSON [ErrorBody] with an HTTP status derived from the
// sentinel errors in errors.go; the client turns them back into an [*Error]
// that wraps the same sentinels, so callers branch with errors.Is on both
// sides of the socket.
//
// The socket itself is the access control: the daemon creates it with mode
// 0600, so only its owner (root, normally) can create or clear snapshots.
//
// Concurrency: a Handler may be called concurrently; it serialises nothing
// itself, the Service does. A Client is safe for concurrent use.
package control
