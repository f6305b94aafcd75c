package nbdsrv

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"sort"
	"sync"
	"time"
)

// Server defaults and hard limits.
const (
	DefaultMaxConns           = 1024
	DefaultMaxRequestsPerConn = 64
	DefaultMaxBytesPerConn    = 64 << 20
	DefaultMaxBytes           = 256 << 20
	DefaultHandshakeTimeout   = 30 * time.Second
	DefaultMaxOptions         = 128

	defaultMinBlock       = 1
	defaultPreferredBlock = 4096
	defaultMaxBlock       = 32 << 20
	// hardMaxBlock bounds the largest payload a client may send or ask for;
	// 2^25 is the size the spec says no peer should consider an attack.
	hardMaxBlock = 32 << 20
)

// Export is one named export.
type Export struct {
	Name, Description string
	Size              int64
	Backend           Backend
	ReadOnly          bool // forced even if Backend implements Writer
	MultiConn         bool // only if a flush on one connection covers writes of all
	// Block size constraints advertised with NBD_INFO_BLOCK_SIZE and
	// enforced on requests; 0 = server defaults (1, 4096, 32 MiB).
	MinBlock, PreferredBlock, MaxBlock uint32
	// MetaContexts, if set, returns the further metadata contexts the
	// export offers besides base:allocation (nil: none). The list may
	// change while the export is served: it is asked for again at every
	// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT, and a
	// connection keeps the contexts its SET selected, so a context taken
	// off the list stays selected where it was (its Extents should then
	// fail). A name that is not "namespace:leaf", is base:allocation,
	// repeats an earlier one or is over 4096 bytes is skipped and logged.
	// It is called during negotiation, concurrently for different
	// connections.
	MetaContexts func() []MetaContext
	// Allow, if set, decides which clients may see and use the export
	// (tls.go); nil allows every client. It is called during negotiation,
	// concurrently for different connections.
	Allow func(Peer) bool
}

// Config configures a Server. Zero values select the defaults above.
type Config struct {
	Logger             *slog.Logger
	MaxConns           int   // connections open at once, negotiating or not
	MaxRequestsPerConn int   // requests in flight per connection
	MaxBytesPerConn    int64 // payload bytes in flight per connection
	MaxBytes           int64 // payload bytes in flight on all connections together (see memory)
	HandshakeTimeout   time.Duration
	MaxOptions         int // options per negotiation (an addition to the design's Config)
	// TLS, if set, is offered with NBD_OPT_STARTTLS (tls.go); nil: never.
	// Set ClientAuth and ClientCAs to verify client certificates, which
	// Export.Allow then sees as Peer.Identities.
	TLS *tls.Config
	// Observe, if set, is called once per request the server answers
	// (validate's refusals included, with d zero), after its I/O and before
	// its reply is sent: the export's name, the command, the payload bytes
	// (the length of a READ or WRITE, 0 for other commands), how long the
	// backend took (for a READ longer than 2 MiB, its first piece), and the
	// errno of the reply (0: success). It runs on the request's goroutine,
	// concurrently with itself, so it must be fast and safe for concurrent
	// use. It lets the owner count and time requests without this package
	// knowing how; nil costs one comparison per request.
	Observe func(export string, cmd Cmd, bytes int, d time.Duration, errno Errno)
}

// Server serves exports over NBD. All methods are safe for concurrent use.
type Server struct {
	cfg    Config
	log    *slog.Logger
	pool   *bufPool
	mem    *memory
	loglim *logLimiter
	zero   []byte // read-only zeros: emulated WRITE_ZEROES and hole detection

	mu         sync.Mutex
	exports    map[string]*export
	defaultExp string
	listeners  map[net.Listener]struct{}
	conns      map[*conn]struct{}
	nextConnID uint64
	closing    bool
	connsDone  *sync.Cond // signalled when a connection leaves conns
	reqPool    sync.Pool
}

// export is an Export plus what the server derives from it once.
type export struct {
	Export
	open    int // connections in transmission on this export; guarded by Server.mu
	removed bool
	base    baseAllocationContext
}

// NewServer returns a server with no exports and no listeners.
func NewServer(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxRequestsPerConn <= 0 {
		cfg.MaxRequestsPerConn = DefaultMaxRequestsPerConn
	}
	if cfg.MaxBytesPerConn <= 0 {
		cfg.MaxBytesPerConn = DefaultMaxBytesPerConn
	}
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxOptions <= 0 {
		cfg.MaxOptions = DefaultMaxOptions
	}
	if cfg.TLS != nil {
		cfg.TLS = cfg.TLS.Clone() // crypto/tls wants it unchanged once in use
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		pool:      newBufPool(),
		mem:       newMemory(cfg.MaxBytes),
		loglim:    newLogLimiter(cfg.Logger),
		zero:      make([]byte, 1<<20),
		exports:   map[string]*export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
	}
	s.connsDone = sync.NewCond(&s.mu)
	return s
}

// AddExport starts serving e. It returns ErrExportExists if the name is
// taken and an error wrapping ErrInvalidExport if e is unusable.
func (s *Server) AddExport(e Export) error {
	ex, err := newExport(e)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("%w: %q", ErrExportExists, e.Name)
	}
	s.exports[e.Name] = ex
	return nil
}

func newExport(e Export) (*export, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w %q: %s", ErrInvalidExport, e.Name, fmt.Sprintf(format, a...))
	}
	if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
		return nil, bad("name or description longer than %d bytes", maxStringLen)
	}
	if e.Backend == nil {
		return nil, bad("no backend")
	}
	if e.Size < 0 {
		return nil, bad("negative size %d", e.Size)
	}
	if e.MinBlock == 0 {
		e.MinBlock = defaultMinBlock
	}
	if e.PreferredBlock == 0 {
		e.PreferredBlock = max(defaultPreferredBlock, e.MinBlock)
	}
	if e.MaxBlock == 0 {
		e.MaxBlock = defaultMaxBlock
	}
	// The spec's constraints on NBD_INFO_BLOCK_SIZE.
	if bits.OnesCount32(e.MinBlock) != 1 || e.MinBlock > 64<<10 {
		return nil, bad("minimum block %d is not a power of two up to 64 KiB", e.MinBlock)
	}
	if bits.OnesCount32(e.PreferredBlock) != 1 || e.PreferredBlock < e.MinBlock || e.PreferredBlock > hardMaxBlock {
		return nil, bad("preferred block %d is not a power of two in [min, 32 MiB]", e.PreferredBlock)
	}
	if e.MaxBlock%e.MinBlock != 0 || e.MaxBlock < e.MinBlock || e.MaxBlock > hardMaxBlock {
		return nil, bad("maximum block %d is not a multiple of the minimum up to 32 MiB", e.MaxBlock)
	}
	return &export{Export: e, base: baseAllocationContext{e.Backend, e.Size}}, nil
}

// RemoveExport stops serving name. With connections open on it, it returns
// ErrExportBusy unless force, which disconnects them first (their in-flight
// requests are cancelled). New connections cannot open it once it returns.
func (s *Server) RemoveExport(name string, force bool) error {
	s.mu.Lock()
	ex, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNoExport, name)
	}
	if ex.open > 0 && !force {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q has %d", ErrExportBusy, name, ex.open)
	}
	delete(s.exports, name)
	ex.removed = true
	var victims []*conn
	for c := range s.conns {
		if c.exp == ex {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.abort()
	}
	// Wait until the forced connections have left, so that the backend is no
	// longer used when RemoveExport returns.
	s.mu.Lock()
	for ex.open > 0 {
		s.connsDone.Wait()
	}
	s.mu.Unlock()
	return nil
}

// SetDefaultExport names the export served for the empty export name ("" to
// serve none).
func (s *Server) SetDefaultExport(name string) {
	s.mu.Lock()
	s.defaultExp = name
	s.mu.Unlock()
}

// OpenConns reports how many connections are in transmission on name.
func (s *Server) OpenConns(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ex, ok := s.exports[name]; ok {
		return ex.open
	}
	return 0
}

// lookup resolves a client-sent name (the empty name is the default export).
func (s *Server) lookup(name string) (*export, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name == "" {
		name = s.defaultExp
	}
	ex, ok := s.exports[name]
	return ex, ok
}

// exportList is every export, sorted by name, for NBD_OPT_LIST.
func (s *Server) exportList() []*export {
	s.mu.Lock()
	l := make([]*export, 0, len(s.exports))
	for _, ex := range s.exports {
		l = append(l, ex)
	}
	s.mu.Unlock()
	sort.Slice(l, func(i, j int) bool { return l[i].Name < l[j].Name })
	return l
}

// attach moves c into transmission on ex, unless ex was removed meanwhile.
// Keeping this under s.mu together with RemoveExport's check is what makes
// "refuse to remove an open export" race-free.
func (s *Server) attach(c *conn, ex *export) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ex.removed || s.closing {
		return false
	}
	ex.open++
	c.exp = ex
	return true
}

// Serve accepts connections on l until Shutdown or an accept error. Several
// Serve calls on different listeners may run at once. It returns
// ErrServerClosed after Shutdown. Clients may start TLS when Config.TLS is
// set, and need not: Serve is ServeMode(l, TLSOptional).
func (s *Server) Serve(l net.Listener) error { return s.ServeMode(l, TLSOptional) }

// ServeMode is Serve with the listener's TLS mode (tls.go). TLSRequired
// needs Config.TLS; without it ServeMode returns an error at once.
func (s *Server) ServeMode(l net.Listener, mode TLSMode) error {
	if mode != TLSOptional && mode != TLSRequired {
		return fmt.Errorf("nbdsrv: serve %s: unknown TLS mode %v", l.Addr(), mode)
	}
	if mode == TLSRequired && s.cfg.TLS == nil {
		return fmt.Errorf("nbdsrv: serve %s: TLS required but Config.TLS is not set", l.Addr())
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Temporary exhaustion (EMFILE and the like): back off
				// rather than spin or give up.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbdsrv: accept: %w", err)
		}
		backoff = 0
		sizeSendBuffer(nc)
		c, err := s.track(nc, mode)
		if errors.Is(err, ErrServerClosed) {
			return err
		}
		if c != nil {
			go c.serve()
		}
	}
}

// track registers a new connection, or closes nc if the server is closing
// or at MaxConns.
func (s *Server) track(nc net.Conn, mode TLSMode) (*conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		nc.Close()
		return nil, ErrServerClosed
	}
	if len(s.conns) >= s.cfg.MaxConns {
		s.log.Warn("nbd: connection refused, too many connections",
			"remote", nc.RemoteAddr().String(), "max_conns", s.cfg.MaxConns)
		nc.Close()
		return nil, nil
	}
	s.nextConnID++
	c := newConn(s, nc, s.nextConnID, mode)
	s.conns[c] = struct{}{}
	return c, nil
}

// forget removes a finished connection.
func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	if c.exp != nil {
		c.exp.open--
	}
	s.connsDone.Broadcast()
	s.mu.Unlock()
}

// Shutdown stops accepting, lets every connection finish the requests it has
// in flight and send their replies, then closes it. If ctx ends first, the
// remaining connections are closed and their requests cancelled, and
// Shutdown returns ctx's error once they are gone.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
	done := make(chan struct{})
	go func() {
		s.mu.Lock()
		for len(s.conns) > 0 {
			s.connsDone.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		go c.abort()
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

// serveConn serves one already accepted connection and returns when it has
// ended (the fuzz tests drive the server through net.Pipe with it).
func (s *Server) serveConn(nc net.Conn, mode TLSMode) {
	if c, _ := s.track(nc, mode); c != nil {
		c.serve()
	}
}
