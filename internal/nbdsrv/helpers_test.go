package nbdsrv

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// memBackend is an in-memory backend with every capability. Hooks let a
// test fail, block or panic chosen calls.
type memBackend struct {
	mu   sync.RWMutex
	data []byte
	// extents, when set, answers base:allocation.
	extents []Extent
	// hook runs at the start of every call; a non-nil error fails it.
	// Set it with setHook once the server runs.
	hook   func(ctx context.Context, op string, off, length int64) error
	hookMu sync.Mutex
	// calls records the operations in order.
	callsMu sync.Mutex
	calls   []string
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) enter(ctx context.Context, op string, off, length int64) error {
	m.callsMu.Lock()
	m.calls = append(m.calls, op)
	m.callsMu.Unlock()
	m.hookMu.Lock()
	h := m.hook
	m.hookMu.Unlock()
	if h != nil {
		return h(ctx, op, off, length)
	}
	return nil
}

func (m *memBackend) setHook(h func(ctx context.Context, op string, off, length int64) error) {
	m.hookMu.Lock()
	m.hook = h
	m.hookMu.Unlock()
}

func (m *memBackend) setExtents(e []Extent) {
	m.mu.Lock()
	m.extents = e
	m.mu.Unlock()
}

func (m *memBackend) ops() []string {
	m.callsMu.Lock()
	defer m.callsMu.Unlock()
	return append([]string(nil), m.calls...)
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := m.enter(ctx, "read", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	op := "write"
	if fua {
		op = "write+fua"
	}
	if err := m.enter(ctx, op, off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error { return m.enter(ctx, "flush", 0, 0) }

func (m *memBackend) Trim(ctx context.Context, off, length int64, fua bool) error {
	if err := m.enter(ctx, "trim", off, length); err != nil {
		return err
	}
	m.zero(off, length)
	return nil
}

func (m *memBackend) Zero(ctx context.Context, off, length int64, f ZeroFlags) error {
	op := "zero"
	if f.NoHole {
		op += "+nohole"
	}
	if f.Fast {
		op += "+fast"
	}
	if err := m.enter(ctx, op, off, length); err != nil {
		return err
	}
	m.zero(off, length)
	return nil
}

func (m *memBackend) zero(off, length int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
}

func (m *memBackend) Cache(ctx context.Context, off, length int64) error {
	return m.enter(ctx, "cache", off, length)
}

func (m *memBackend) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := m.enter(ctx, "extents", off, length); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.extents == nil {
		return []Extent{{Length: length}}, nil
	}
	// m.extents describe the whole export from 0; return those from off.
	var out []Extent
	pos := int64(0)
	for _, e := range m.extents {
		end := pos + e.Length
		if end > off {
			s := max(pos, off)
			out = append(out, Extent{Length: end - s, Flags: e.Flags})
		}
		pos = end
	}
	return out, nil
}

// readOnlyMem exposes only ReadAt.
type readOnlyMem struct{ m *memBackend }

func (r readOnlyMem) ReadAt(ctx context.Context, p []byte, off int64) error {
	return r.m.ReadAt(ctx, p, off)
}

// writeOnlyMem is writable but has no Zeroer, Trimmer, Cacher or Flusher:
// write zeroes is emulated.
type writeOnlyMem struct{ m *memBackend }

func (w writeOnlyMem) ReadAt(ctx context.Context, p []byte, off int64) error {
	return w.m.ReadAt(ctx, p, off)
}
func (w writeOnlyMem) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return w.m.WriteAt(ctx, p, off, fua)
}

// staticContext is a MetaContext with fixed extents from offset 0.
type staticContext struct {
	name string
	exts []Extent
}

func (s staticContext) Name() string { return s.name }
func (s staticContext) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	m := memBackend{extents: s.exts}
	return m.Extents(ctx, off, length)
}

// contextList is an Export.MetaContexts that always offers mcs.
func contextList(mcs ...MetaContext) func() []MetaContext {
	return func() []MetaContext { return mcs }
}

// contextSet is an Export.MetaContexts whose list a test changes while the
// export is served, as the daemon does when snapshots come and go. A
// context dropped from it fails its Extents from then on.
type contextSet struct {
	mu   sync.Mutex
	list []*droppable
}

// droppable is a staticContext that fails once dropped.
type droppable struct {
	staticContext
	dropped atomic.Bool
}

func (d *droppable) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if d.dropped.Load() {
		return nil, fmt.Errorf("meta context %s is gone: %w", d.name, syscall.EIO)
	}
	return d.staticContext.Extents(ctx, off, length)
}

func (s *contextSet) add(name string, exts ...Extent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.list = append(s.list, &droppable{staticContext: staticContext{name: name, exts: exts}})
}

func (s *contextSet) drop(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, d := range s.list {
		if d.name == name {
			d.dropped.Store(true)
			s.list = append(s.list[:i:i], s.list[i+1:]...)
			return
		}
	}
}

func (s *contextSet) contexts() []MetaContext {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := make([]MetaContext, len(s.list))
	for i, d := range s.list {
		l[i] = d
	}
	return l
}

type testServer struct {
	*Server
	addr string
	logs *testenv.SyncBuffer
	done chan error
}

// shortTempDir returns a directory whose path fits a unix socket name.
func shortTempDir(t testing.TB) string {
	d := t.TempDir()
	if len(d) < 80 {
		return d
	}
	d, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startServer serves exps on a fresh unix socket; the server is shut down
// when the test ends.
func startServer(t testing.TB, cfg Config, exps ...Export) *testServer {
	t.Helper()
	logs := &testenv.SyncBuffer{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s := NewServer(cfg)
	for _, e := range exps {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	addr := filepath.Join(shortTempDir(t), "s.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, addr: addr, logs: logs, done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-ts.done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return ts
}

// rawClient speaks NBD byte by byte so tests can script any exchange,
// including broken ones.
type rawClient struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
	// tls, when set, makes handshake start TLS right after the client
	// flags (see startTLS).
	tls *tls.Config
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c, br: bufio.NewReader(c)}
}

func (rc *rawClient) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawClient) read(n int) []byte {
	rc.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc.br, b); err != nil {
		rc.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// expectClosed asserts the server closes the connection (possibly after
// sending something, which is discarded).
func (rc *rawClient) expectClosed() {
	rc.t.Helper()
	rc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, rc.br)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			rc.t.Fatalf("server did not close the connection")
		}
	}
}

// handshake reads the greeting and answers with client flags.
func (rc *rawClient) handshake(flags ClientFlags) {
	rc.t.Helper()
	g := rc.read(18)
	if binary.BigEndian.Uint64(g) != magicNBD || binary.BigEndian.Uint64(g[8:]) != magicIHaveOpt {
		rc.t.Fatalf("bad greeting % x", g)
	}
	if hf := HandshakeFlags(binary.BigEndian.Uint16(g[16:])); hf != FlagFixedNewstyle|FlagNoZeroes {
		rc.t.Fatalf("handshake flags %#x", hf)
	}
	rc.write(be32(uint32(flags)))
	if rc.tls != nil {
		rc.startTLS(rc.tls)
	}
}

func (rc *rawClient) sendOpt(opt Opt, data []byte) {
	rc.t.Helper()
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b, magicIHaveOpt)
	binary.BigEndian.PutUint32(b[8:], uint32(opt))
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	rc.write(append(b, data...))
}

type optReply struct {
	opt  Opt
	rep  Rep
	data []byte
}

func (rc *rawClient) readOptReply() optReply {
	rc.t.Helper()
	h := rc.read(20)
	if m := binary.BigEndian.Uint64(h); m != magicOptReply {
		rc.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: Opt(binary.BigEndian.Uint32(h[8:])), rep: Rep(binary.BigEndian.Uint32(h[12:]))}
	r.data = rc.read(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// expectRep reads one reply and checks its type.
func (rc *rawClient) expectRep(opt Opt, rep Rep) optReply {
	rc.t.Helper()
	r := rc.readOptReply()
	if r.opt != opt || r.rep != rep {
		rc.t.Fatalf("got %v %v (%q), want %v %v", r.opt, r.rep, r.data, opt, rep)
	}
	return r
}

func nameAndInfos(name string, infos ...InfoType) []byte {
	b := append(be32(uint32(len(name))), name...)
	b = append(b, be16(uint16(len(infos)))...)
	for _, i := range infos {
		b = append(b, be16(uint16(i))...)
	}
	return b
}

func metaPayload(name string, queries ...string) []byte {
	b := append(be32(uint32(len(name))), name...)
	b = append(b, be32(uint32(len(queries)))...)
	for _, q := range queries {
		b = append(b, be32(uint32(len(q)))...)
		b = append(b, q...)
	}
	return b
}

type exportInfo struct {
	size                   uint64
	flags                  TransFlags
	name, desc             string
	minB, prefB, maxB      uint32
	hasBlockSize, hasName  bool
	hasDesc, hasExportInfo bool
}

// info sends INFO or GO and collects the INFO replies up to the ACK.
func (rc *rawClient) info(opt Opt, name string, infos ...InfoType) exportInfo {
	rc.t.Helper()
	rc.sendOpt(opt, nameAndInfos(name, infos...))
	var ei exportInfo
	for {
		r := rc.readOptReply()
		if r.opt != opt {
			rc.t.Fatalf("reply for %v, want %v", r.opt, opt)
		}
		if r.rep == RepAck {
			break
		}
		if r.rep != RepInfo {
			rc.t.Fatalf("%v: %v %q", opt, r.rep, r.data)
		}
		switch InfoType(binary.BigEndian.Uint16(r.data)) {
		case InfoExport:
			ei.hasExportInfo = true
			ei.size = binary.BigEndian.Uint64(r.data[2:])
			ei.flags = TransFlags(binary.BigEndian.Uint16(r.data[10:]))
		case InfoName:
			ei.hasName, ei.name = true, string(r.data[2:])
		case InfoDescription:
			ei.hasDesc, ei.desc = true, string(r.data[2:])
		case InfoBlockSize:
			ei.hasBlockSize = true
			ei.minB = binary.BigEndian.Uint32(r.data[2:])
			ei.prefB = binary.BigEndian.Uint32(r.data[6:])
			ei.maxB = binary.BigEndian.Uint32(r.data[10:])
		}
	}
	if !ei.hasExportInfo {
		rc.t.Fatalf("%v: no NBD_INFO_EXPORT", opt)
	}
	return ei
}

// open negotiates (structured replies and meta contexts optionally) and
// enters transmission on name.
func (rc *rawClient) open(name string, structured bool, contexts ...string) (exportInfo, map[uint32]string) {
	rc.t.Helper()
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	var ids map[uint32]string
	if structured {
		rc.sendOpt(OptStructuredReply, nil)
		rc.expectRep(OptStructuredReply, RepAck)
		if len(contexts) > 0 {
			ids = rc.setMeta(name, contexts...)
		}
	}
	return rc.info(OptGo, name), ids
}

// setMeta sends SET_META_CONTEXT and returns the selected ids.
func (rc *rawClient) setMeta(name string, queries ...string) map[uint32]string {
	rc.t.Helper()
	rc.sendOpt(OptSetMetaContext, metaPayload(name, queries...))
	ids := map[uint32]string{}
	for {
		r := rc.readOptReply()
		if r.rep == RepAck {
			return ids
		}
		if r.rep != RepMetaContext {
			rc.t.Fatalf("SET_META_CONTEXT: %v %q", r.rep, r.data)
		}
		ids[binary.BigEndian.Uint32(r.data)] = string(r.data[4:])
	}
}

// listMeta sends LIST_META_CONTEXT and returns the names (or the error).
func (rc *rawClient) listMeta(name string, queries ...string) ([]string, Rep) {
	rc.t.Helper()
	rc.sendOpt(OptListMetaContext, metaPayload(name, queries...))
	var names []string
	for {
		r := rc.readOptReply()
		switch r.rep {
		case RepAck:
			return names, RepAck
		case RepMetaContext:
			if id := binary.BigEndian.Uint32(r.data); id != 0 {
				rc.t.Errorf("LIST_META_CONTEXT id %d, want 0", id)
			}
			names = append(names, string(r.data[4:]))
		default:
			return names, r.rep
		}
	}
}

func (rc *rawClient) request(cmd Cmd, flags CmdFlags, cookie, off uint64, length uint32, payload []byte) {
	rc.t.Helper()
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], uint16(flags))
	binary.BigEndian.PutUint16(b[6:], uint16(cmd))
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	rc.write(append(b, payload...))
}

// simple reads a simple reply; data (dataLen bytes) follows only on success.
func (rc *rawClient) simple(dataLen int) (Errno, uint64, []byte) {
	rc.t.Helper()
	h := rc.read(16)
	if m := binary.BigEndian.Uint32(h); m != magicSimpleReply {
		rc.t.Fatalf("simple reply magic %#x", m)
	}
	e, cookie := Errno(binary.BigEndian.Uint32(h[4:])), binary.BigEndian.Uint64(h[8:])
	var data []byte
	if e == 0 && dataLen > 0 {
		data = rc.read(dataLen)
	}
	return e, cookie, data
}

type chunk struct {
	flags   uint16
	typ     ReplyType
	cookie  uint64
	payload []byte
}

func (rc *rawClient) chunk() chunk {
	rc.t.Helper()
	h := rc.read(20)
	if m := binary.BigEndian.Uint32(h); m != magicStructReply {
		rc.t.Fatalf("structured reply magic %#x", m)
	}
	return chunk{
		flags:   binary.BigEndian.Uint16(h[4:]),
		typ:     ReplyType(binary.BigEndian.Uint16(h[6:])),
		cookie:  binary.BigEndian.Uint64(h[8:]),
		payload: rc.read(int(binary.BigEndian.Uint32(h[16:]))),
	}
}

// chunkErrno decodes an ERROR or ERROR_OFFSET chunk.
func chunkErrno(t testing.TB, c chunk) (Errno, string) {
	t.Helper()
	if c.typ != ReplyError && c.typ != ReplyErrorOffset {
		t.Fatalf("chunk %v, want an error", c.typ)
	}
	n := binary.BigEndian.Uint16(c.payload[4:])
	return Errno(binary.BigEndian.Uint32(c.payload)), string(c.payload[6 : 6+n])
}

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

func newTestLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func ioReadFull(r io.Reader, b []byte) (int, error) { return io.ReadFull(r, b) }

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func contains(logs, s string) bool { return strings.Contains(logs, s) }

// bytesAt returns a copy of the backend's data (under its lock, so the race
// detector sees the ordering the socket provides).
func (m *memBackend) bytesAt(off, n int) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

func (m *memBackend) fill(b byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.data {
		m.data[i] = b
	}
}
