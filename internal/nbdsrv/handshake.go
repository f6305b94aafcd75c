package nbdsrv

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one client connection. Its life: handshake and option haggling
// (handshake.go, options.go) under the handshake deadline, then
// transmission (transmission.go) with one reader goroutine (the one that
// runs serve), one goroutine per admitted request, and one reply writer.
type conn struct {
	s *Server
	// raw is the accepted socket. Close and deadlines go to it, from any
	// goroutine (abort, drain), whether TLS runs on it or not.
	raw net.Conn
	// nc is what the protocol reads and writes: raw, or the TLS session
	// on it once STARTTLS succeeded. Changed only by the reader goroutine
	// during negotiation, before any other goroutine uses it.
	nc   net.Conn
	mode TLSMode // the listener's
	id   uint64
	log  *slog.Logger
	br   *connReader // reads nc

	// ctx is cancelled when the connection dies (client gone, forced
	// removal, Shutdown deadline); every backend call gets it.
	ctx    context.Context
	cancel context.CancelFunc

	// Negotiated state; written only by the reader goroutine before
	// transmission starts, read-only afterwards.
	exp           *export // also read by Server under Server.mu
	noZeroes      bool
	fixedNewstyle bool                 // TLS is possible only with it
	tlsConn       *tls.Conn            // nil until STARTTLS succeeded
	tlsState      *tls.ConnectionState // tlsConn's, for Export.Allow
	structured    bool
	metaExp       *export           // export the last SET_META_CONTEXT named
	meta          []selectedContext // what that SET selected (metacontext.go)
	flags         TransFlags
	state         exportState

	// Transmission.
	budget   *budget
	wq       replyQueue
	work     chan *request  // reader to idle workers
	inflight sync.WaitGroup // workers alive
	requests int            // requests read, up to busyAfter; reader goroutine only
	service  serviceTime    // when the reader runs requests itself (inline.go)
	turn     atomic.Pointer[readTurn]
	dog      watchdog      // takes the reading over from a request run too long
	readEnd  chan struct{} // the reader's last turn ended
	// Replies of requests the reader ran or refused, not yet queued for
	// writing (see hold); reader goroutine only.
	held      []*request
	heldBytes int

	draining  atomic.Bool // Shutdown: stop reading new requests
	abortOnce sync.Once
}

// Per-connection read buffer. It starts small, because 1000 idle
// connections must stay cheap, and grows to busyReadBuf once the client
// has sent busyAfter requests: then one socket read takes in a burst of
// pipelined requests (4 KiB writes at queue depth 32: about three times
// fewer socket reads, and measurably less server CPU per request).
// Payloads larger than the buffer are read directly into their pooled
// buffers.
const (
	connReadBuf = 16 << 10
	busyReadBuf = 128 << 10
	busyAfter   = 64
)

func newConn(s *Server, nc net.Conn, id uint64, mode TLSMode) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &conn{
		s:      s,
		raw:    nc,
		nc:     nc,
		mode:   mode,
		id:     id,
		log:    s.log.With("conn", id),
		ctx:    ctx,
		cancel: cancel,
		budget: newBudget(s.cfg.MaxRequestsPerConn, s.cfg.MaxBytesPerConn),
	}
	c.wq.idle.L = &c.wq.mu
	return c
}

// errQuiet ends a connection without anything to log: the client went away
// or asked to.
var errQuiet = errors.New("connection ended")

// protoError is a client protocol violation that ends the connection; it is
// logged at warn.
type protoError struct{ msg string }

func (e *protoError) Error() string { return e.msg }

func protoErrorf(format string, a ...any) error {
	return &protoError{fmt.Sprintf(format, a...)}
}

func (c *conn) serve() {
	defer c.s.forget(c)
	defer c.abort()
	defer c.endTLS()
	defer c.recoverPanic("connection")

	// The deadline covers the TLS handshake too: STARTTLS is an option.
	c.raw.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	if c.draining.Load() {
		return
	}
	c.br = newConnReader(c.nc, connReadBuf)
	if err := c.negotiate(); err != nil {
		c.logEnd("negotiation", err)
		return
	}
	c.raw.SetDeadline(time.Time{})
	c.log = c.log.With("export", c.exp.Name)
	c.transmit()
}

// logEnd logs why a connection ended, at the level the cause deserves.
func (c *conn) logEnd(phase string, err error) {
	var pe *protoError
	var ne net.Error
	switch {
	case errors.Is(err, errQuiet), errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, io.ErrUnexpectedEOF) && phase == "negotiation" && c.draining.Load():
	case errors.As(err, &pe):
		c.log.Warn("nbd: client protocol violation, closing connection", "phase", phase, "err", err)
	case errors.As(err, &ne) && ne.Timeout():
		if !c.draining.Load() {
			c.log.Warn("nbd: handshake timed out, closing connection", "phase", phase,
				"timeout", c.s.cfg.HandshakeTimeout)
		}
	case errors.Is(err, errTLSHandshake):
		// A client refused here is worth a line: a wrong or missing
		// certificate, or not TLS at all.
		c.log.Warn("nbd: TLS handshake failed, closing connection", "remote", c.raw.RemoteAddr().String(), "err", err)
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, os.ErrDeadlineExceeded):
	default:
		c.log.Debug("nbd: connection ended", "phase", phase, "err", err)
	}
}

// abort kills the connection now: the socket is closed (unblocking the
// reader and the writer), in-flight requests see their context cancelled,
// and the reader stops waiting for budget. Safe to call more than once and
// from any goroutine.
func (c *conn) abort() {
	c.abortOnce.Do(func() {
		c.cancel()
		c.budget.close()
		c.raw.Close()
	})
}

// drain asks the connection to finish what it has in flight and close:
// Shutdown. The flag is set before the deadline so that the reader either
// sees the flag or has its read interrupted.
func (c *conn) drain() {
	c.draining.Store(true)
	c.raw.SetReadDeadline(time.Now())
}

// recoverPanic turns a panic in one of the connection's goroutines into the
// end of that connection only. It must be deferred directly.
func (c *conn) recoverPanic(where string) {
	if r := recover(); r != nil {
		c.log.Error("nbd: panic, closing connection", "in", where, "panic", fmt.Sprint(r),
			"stack", string(debug.Stack()))
		c.abort()
	}
}

// handshake sends the server's greeting and reads the client flags.
//
//	S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags
//	C: u32 client flags
func (c *conn) handshake() error {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicNBD)
	binary.BigEndian.PutUint64(b[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(b[16:], uint16(FlagFixedNewstyle|FlagNoZeroes))
	if _, err := c.nc.Write(b[:]); err != nil {
		return err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return err
	}
	cf := ClientFlags(binary.BigEndian.Uint32(b[:4]))
	if cf&^clientFlagsKnown != 0 {
		// The spec: a server MUST close on client flags it does not know.
		return protoErrorf("unknown client flags %#x", uint32(cf))
	}
	c.noZeroes = cf&ClientFlagNoZeroes != 0
	c.fixedNewstyle = cf&ClientFlagFixedNewstyle != 0
	if c.mode == TLSRequired && !c.fixedNewstyle {
		// The spec allows TLS only after the fixed newstyle handshake, and
		// this listener serves nothing without TLS.
		return protoErrorf("client flags %#x lack FIXED_NEWSTYLE, which TLS needs and this listener requires", uint32(cf))
	}
	return nil
}
