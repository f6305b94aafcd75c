// Package nbdsrv is nbdsnap's NBD server: it serves any number of named
// exports, each backed by a Backend, over unix sockets and TCP, following
// the NBD protocol specification (fixed newstyle negotiation, simple and
// structured replies, metadata contexts). It knows nothing about snapshots.
//
// # Main types
//
// A Backend needs only ReadAt; the optional interfaces Writer, Flusher,
// Trimmer, Zeroer, Cacher and Extenter, found by type assertion, turn on the
// matching transmission flags. An Export names a Backend and its size, and
// may add MetaContexts (for example a qemu:dirty-bitmap:NAME changed-block
// map) besides the built-in base:allocation: a function asked at every
// LIST and SET_META_CONTEXT, so that the list can change while the export
// is served; a connection keeps the contexts its SET selected
// (metacontext.go). It may also have an Allow function that
// decides, from the client's Peer (addresses, TLS state, the identities of
// its verified certificate), whether the client may see and use it. A
// Server holds the exports, which can be added and removed at run time
// (RemoveExport refuses an export a client has open unless forced), and
// serves listeners, each with a TLSMode (ServeMode): TLS optional or
// required, offered with NBD_OPT_STARTTLS when Config.TLS is set.
//
// Config.Observe, if set, is called once per answered request (export,
// command, bytes, backend time, errno), so that the owner can count and
// time requests; the package itself knows nothing of metrics libraries.
//
// # Files by phase
//
// handshake.go (greeting, client flags, connection life), options.go
// (option haggling), metacontext.go (LIST and SET_META_CONTEXT, the
// query rules), tls.go (STARTTLS, the TLS modes, who may use an
// export), validate.go (the one gate every request passes),
// transmission.go (reader, handlers, reply writer), inline.go (requests
// run on the reader, its watchdog), reply.go (reply layout), constants.go
// (wire constants), pool.go (buffers and the per-connection budget),
// memory.go (the budget of all connections together), loglimit.go
// (per-request log lines, rate-limited). docs/protocol.md lists what is
// supported, what is refused with which error, and the limits.
//
// # Concurrency
//
// Each connection has one reader goroutine and worker goroutines that serve
// its requests in parallel (at most Config.MaxRequestsPerConn requests in
// flight, holding at most Config.MaxBytesPerConn payload bytes, and all
// connections together at most Config.MaxBytes); workers
// are started on demand and exit when idle. While the backend answers short
// requests fast, the reader runs them itself, without a hand-off, and a
// watchdog hands the reading to a new goroutine if one of them runs past a
// millisecond (inline.go). Replies are written in completion order by one
// writer at a time (the goroutine that finds the reply queue idle drains
// it), many replies, headers and data, in one writev. Backend methods are
// therefore called concurrently, also across connections.
// Each backend call gets a context that is cancelled when the connection
// dies. Negotiation runs under Config.HandshakeTimeout; no backend method
// is called before the client has chosen an export. A panic in any
// connection goroutine is logged with its stack and closes that connection
// only.
//
// # Errors
//
// A backend error is logged (with the conn, export and cookie attributes)
// and answered with the NBD errno errors.Is finds for it (EIO if none);
// the connection stays up. Only framing errors (bad magic, a write payload
// too large to skip) and negotiation violations close a connection.
//
// # Caveats
//
// No extended headers, no NBD_CMD_RESIZE. Over TLS each reply buffer is a
// TLS record of its own: the writev that batches replies on a plain socket
// becomes one write per buffer. Shutdown interrupts a
// request whose payload is still arriving; its client sees the connection
// close, as after a server restart.
package nbdsrv
