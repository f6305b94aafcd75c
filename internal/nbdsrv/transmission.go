package nbdsrv

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"time"
)

// Transmission. Per connection:
//   - the reader (this goroutine) reads a request, passes it through
//     validate, waits for room in the budget, reads a WRITE payload into a
//     pooled buffer and either runs the request itself (a short request
//     while the backend answers fast, see inline.go) or hands it to an idle
//     worker goroutine, starting one if none is idle;
//   - each worker does the backend I/O, lays out the reply and queues it,
//     then waits for the next request; workers run in parallel, so replies
//     go out in completion order, not request order (NBD allows it: cookies
//     match them up). Workers live on while busy and exit after
//     workerIdle without work, so a goroutine (and its grown stack) is not
//     created per request, and an idle connection holds none;
//   - replies are written by one writer at a time: whichever goroutine
//     queues a reply while no write is under way becomes the writer and
//     sends everything queued, again and again until the queue is empty,
//     header and data of many replies in one writev. Replies queued while it
//     writes go out in its next batch. This keeps the socket writes
//     serialised without a goroutine hop per reply (a dedicated writer
//     goroutine cost a wake-up per batch, measurably more CPU per request).

const (
	// maxBlockStatusDescs bounds descriptors per context per reply, and
	// so the reply buffer; the client asks again for the rest.
	maxBlockStatusDescs = 4096
	// minHoleLen is the shortest read worth checking for all zeros, to
	// answer with a 32-byte hole chunk instead of the data.
	minHoleLen = 512
	// readChunk is the most a READ holds in memory: a longer one is read
	// and sent a piece at a time (streamRest), so that a client asking for
	// 32 MiB and not reading the reply pins 1 MiB, not 32.
	readChunk = 1 << 20
)

var (
	errDisc  = errors.New("client sent NBD_CMD_DISC")
	errDrain = errors.New("server shutting down")
	// errHandedOver ends a reader's turn whose request ran so long that
	// another goroutine took over the reading.
	errHandedOver = errors.New("reading handed over")
	errPanic      = errors.New("reader panicked")
)

func (c *conn) transmit() {
	c.work = make(chan *request)
	c.readEnd = make(chan struct{}, 1)
	c.dog.timer = time.AfterFunc(time.Hour, c.tick) // armed by runInline
	c.dog.timer.Stop()
	defer c.endTransmission()
	t := new(readTurn)
	c.turn.Store(t)
	c.inflight.Add(1)
	c.read(t) // here, or on a goroutine that took over (tick)
	<-c.readEnd
}

// endTransmission waits for every worker; each has sent (or dropped) the
// replies of its requests before it ends, so nothing touches the backend or
// the budget once the connection is forgotten. A reply can be left queued
// only if a writer panicked; it is released here.
func (c *conn) endTransmission() {
	c.dog.timer.Stop()
	close(c.work) // only the reader sends, and its last turn has ended
	c.inflight.Wait()
	c.wq.mu.Lock()
	left := c.wq.q
	c.wq.q = nil
	c.wq.mu.Unlock()
	for _, r := range left {
		c.release(r)
	}
}

// read runs one turn of reading: readLoop, until it ends the connection's
// transmission or hands the reading over (see tick). The last turn
// ends the transmission itself (transmit may be the goroutine still busy
// in a request that only the abort would end), then tells transmit.
func (c *conn) read(t *readTurn) {
	defer c.inflight.Done()
	err := errPanic
	defer func() {
		if errors.Is(err, errHandedOver) {
			return // the held replies passed to the next turn
		}
		c.flushHeld()
		if !errors.Is(err, errDisc) && !errors.Is(err, errDrain) {
			// The client is gone or broke the protocol: cancel what it
			// has in flight, nobody will read the replies. (A graceful
			// end lets the requests in flight finish and reply.)
			c.logEnd("transmission", err)
			c.abort()
		}
		c.readEnd <- struct{}{}
	}()
	defer c.recoverPanic("reader")
	err = c.readLoop(t)
}

func (c *conn) readLoop(t *readTurn) error {
	var h [requestHeaderLen]byte
	for {
		// Held replies go out before any read that may wait for the
		// client (which may be waiting for them).
		if c.br.Buffered() < requestHeaderLen {
			c.flushHeld()
		}
		if c.requests < busyAfter {
			if c.requests++; c.requests == busyAfter {
				c.br.Resize(busyReadBuf)
			}
		}
		if c.draining.Load() {
			return errDrain
		}
		// The magic is checked on its own first, so that a stream that is
		// not NBD is dropped without waiting for a whole header.
		if _, err := io.ReadFull(c.br, h[:4]); err != nil {
			if c.draining.Load() {
				return errDrain
			}
			return err
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != magicRequest {
			return protoErrorf("bad request magic %#x", m)
		}
		if _, err := io.ReadFull(c.br, h[4:]); err != nil {
			if c.draining.Load() {
				return errDrain
			}
			return err
		}
		ri := reqInfo{
			flags:  CmdFlags(binary.BigEndian.Uint16(h[4:])),
			cmd:    Cmd(binary.BigEndian.Uint16(h[6:])),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		cookie := binary.BigEndian.Uint64(h[8:])
		if ri.cmd == CmdDisc {
			return errDisc
		}
		// A WRITE's payload must be consumed to stay in step with the
		// stream. Up to 32 MiB (which the spec says no peer should treat as
		// an attack) it is skipped when refused; beyond, the connection
		// ends.
		if ri.cmd == CmdWrite && ri.length > hardMaxBlock {
			return protoErrorf("write of %d bytes (cookie %#x) over the %d-byte limit", ri.length, cookie, hardMaxBlock)
		}
		r := c.s.getRequest()
		r.reqInfo, r.cookie = ri, cookie
		if errno, reason := validate(ri, c.state); errno != 0 {
			if ri.cmd == CmdWrite {
				if _, err := io.CopyN(io.Discard, c.br, int64(ri.length)); err != nil {
					c.s.putRequest(r)
					return err
				}
			}
			// A client violating the protocol is worth a warning, but not
			// a line per request (loglim).
			c.s.loglim.logf(c.ctx, c.log, slog.LevelWarn, c.exp.Name+": "+reason, "nbd: request refused",
				"cookie", cookie, "cmd", ri.cmd, "flags", ri.flags, "offset", ri.off, "length", ri.length,
				"errno", errno, "reason", reason)
			r.errno, r.reason = errno, reason
			if obs := c.s.cfg.Observe; obs != nil {
				obs(c.exp.Name, ri.cmd, payloadBytes(ri), 0, errno)
			}
			if !c.acquire(0) {
				c.s.putRequest(r)
				return errQuiet
			}
			c.setReply(r)
			c.hold(r)
			continue
		}
		r.cost = c.cost(ri)
		if !c.acquire(r.cost) {
			c.s.putRequest(r)
			return errQuiet
		}
		inline := inlineCandidate(ri) && c.service.fast()
		if ri.cmd == CmdWrite {
			n := int(ri.length)
			if inline && c.br.Buffered() >= n {
				// Written from the read buffer in place (see
				// connReader.Next and tick).
				r.data = c.br.Next(n)
			} else {
				if c.br.Buffered() < n {
					c.flushHeld()
				}
				r.buf = c.s.pool.get(n)
				if _, err := io.ReadFull(c.br, *r.buf); err != nil {
					c.release(r)
					if c.draining.Load() {
						return errDrain
					}
					return err
				}
				r.data = *r.buf
			}
		}
		if inline {
			if !c.runInline(t, r) {
				return errHandedOver
			}
			continue
		}
		c.dispatch(r)
	}
}

// acquire takes budget for a request the reader admits: the connection's,
// then the server's memory. Held replies hold budget themselves, so they
// are sent before the reader waits for either.
func (c *conn) acquire(cost int64) bool {
	if !c.budget.tryAcquire(cost) {
		c.flushHeld()
		if !c.budget.acquire(cost) {
			return false
		}
	}
	if c.s.mem.tryAcquire(cost) {
		return true
	}
	c.flushHeld()
	if c.s.mem.acquire(c.ctx, cost) {
		return true
	}
	c.budget.release(cost)
	return false
}

// dispatch hands r to an idle worker, or starts a worker for it. Workers
// stay bounded without a cap of their own (a cap would need the reader to
// wait for a worker, and one about to exit on its idle timer might never
// take the request): a worker is started only when none is idle and r holds
// a budget slot, and a worker that is not idle either holds such a request,
// or is the one writing replies, or is between the two for a few
// instructions. So about MaxRequestsPerConn+1 exist at most.
func (c *conn) dispatch(r *request) {
	select {
	case c.work <- r:
		return
	default:
	}
	c.inflight.Add(1)
	go c.worker(r)
}

// workerIdle is how long a worker waits for another request before it
// exits.
const workerIdle = 2 * time.Second

func (c *conn) worker(r *request) {
	defer c.inflight.Done()
	defer c.recoverPanic("reply writer")
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		if c.timedHandle(r) {
			if r.errno == 0 && r.streamed() {
				c.streamRest(r)
			} else {
				c.send(r)
			}
		}
		idle.Reset(workerIdle)
		var ok bool
		select {
		case r, ok = <-c.work:
			if !ok {
				return
			}
		case <-idle.C:
			return
		}
	}
}

// cost is the buffer space a request holds until its reply is sent.
func (c *conn) cost(ri reqInfo) int64 {
	switch ri.cmd {
	case CmdRead:
		return int64(min(ri.length, readChunk))
	case CmdWrite:
		return int64(ri.length)
	case CmdBlockStatus:
		return int64(len(c.meta)) * blockStatusChunkMax(ri.flags)
	}
	return 0
}

func blockStatusChunkMax(f CmdFlags) int64 {
	n := int64(maxBlockStatusDescs)
	if f&FlagReqOne != 0 {
		n = 1
	}
	return structReplyLen + 4 + 8*n
}

// handle runs one request's I/O and lays out its reply; the caller sends
// it. A panic ends only this connection: r is then released here and
// handle reports false.
func (c *conn) handle(r *request) (ok bool) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in request, closing connection", "cookie", r.cookie, "cmd", r.cmd,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			c.abort()
			c.release(r)
			ok = false
		}
	}()
	if err := c.do(r); err != nil {
		c.failed(r, err)
		if r.cmd == CmdRead || r.cmd == CmdBlockStatus {
			c.s.pool.put(r.buf)
			r.buf = nil
		}
	}
	c.setReply(r)
	return true
}

// failed records the backend's error as r's and logs it.
func (c *conn) failed(r *request, err error) {
	r.errno, r.ioFailed = errnoOf(err), true
	if r.reason == "" {
		r.reason = r.errno.String()
	}
	if c.ctx.Err() == nil && !errors.Is(err, ErrNotFast) {
		c.s.loglim.logf(c.ctx, c.log, slog.LevelError, c.exp.Name+": "+r.cmd.String()+" "+r.errno.String(),
			"nbd: request failed", "cookie", r.cookie, "cmd", r.cmd, "offset", r.off, "length", r.length,
			"errno", r.errno, "err", err)
	}
}

// do performs r's I/O on the backend; of a streamed READ, only the first
// piece (streamRest does the rest).
func (c *conn) do(r *request) error {
	ctx, b := c.ctx, c.exp.Backend
	off, n := int64(r.off), int64(r.length)
	fua := r.flags&FlagFUA != 0
	switch r.cmd {
	case CmdRead:
		r.buf = c.s.pool.get(int(min(r.length, readChunk)))
		if err := b.ReadAt(ctx, *r.buf, off); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		r.hole = c.structured && !r.streamed() && r.length >= minHoleLen && c.s.isZero(*r.buf)
		return nil
	case CmdWrite:
		// validate admitted the write, so the export is writable.
		if err := b.(Writer).WriteAt(ctx, r.data, off, fua); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		return nil
	case CmdFlush:
		if err := b.(Flusher).Flush(ctx); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
		return nil
	case CmdTrim:
		if err := b.(Trimmer).Trim(ctx, off, n, fua); err != nil {
			return fmt.Errorf("trim: %w", err)
		}
		return nil
	case CmdCache:
		if err := b.(Cacher).Cache(ctx, off, n); err != nil {
			return fmt.Errorf("cache: %w", err)
		}
		return nil
	case CmdWriteZeroes:
		return c.writeZeroes(ctx, r, off, n, fua)
	case CmdBlockStatus:
		return c.blockStatus(ctx, r)
	}
	return fmt.Errorf("command %v passed validation without a handler", r.cmd)
}

func (c *conn) writeZeroes(ctx context.Context, r *request, off, n int64, fua bool) error {
	flags := ZeroFlags{NoHole: r.flags&FlagNoHole != 0, Fast: r.flags&FlagFastZero != 0, FUA: fua}
	if z, ok := c.exp.Backend.(Zeroer); ok {
		if err := z.Zero(ctx, off, n, flags); err != nil {
			return fmt.Errorf("write zeroes: %w", err)
		}
		return nil
	}
	if flags.Fast {
		// Writing zeros is exactly what a fast zero must not fall back to.
		return ErrNotFast
	}
	w := c.exp.Backend.(Writer)
	for n > 0 {
		k := min(n, int64(len(c.s.zero)))
		if err := w.WriteAt(ctx, c.s.zero[:k], off, fua); err != nil {
			return fmt.Errorf("write zeroes (emulated) at %d: %w", off, err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// blockStatus builds one NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected
// context into a pooled buffer; the last carries the DONE flag.
//
//	chunk header, u32 context id, (u32 length, u32 flags)*
func (c *conn) blockStatus(ctx context.Context, r *request) error {
	maxDescs := maxBlockStatusDescs
	if r.flags&FlagReqOne != 0 {
		maxDescs = 1
	}
	r.buf = c.s.pool.get(int(r.cost))
	out := (*r.buf)[:0]
	for k, sc := range c.meta {
		exts, err := sc.mc.Extents(ctx, int64(r.off), int64(r.length))
		if err != nil {
			return fmt.Errorf("block status %s: %w", sc.name, err)
		}
		start := len(out)
		out = out[:start+structReplyLen+4]
		binary.BigEndian.PutUint32(out[start+structReplyLen:], sc.id)
		left := uint64(r.length)
		descs := 0
		var last []byte
		for _, e := range exts {
			if e.Length <= 0 || left == 0 {
				break
			}
			l := min(uint64(e.Length), left)
			left -= l
			if last != nil && binary.BigEndian.Uint32(last[4:]) == e.Flags {
				// Merging keeps the answer short; the sum never exceeds
				// the request length, a uint32.
				binary.BigEndian.PutUint32(last, binary.BigEndian.Uint32(last)+uint32(l))
				continue
			}
			if descs == maxDescs {
				break
			}
			p := len(out)
			out = out[:p+8]
			binary.BigEndian.PutUint32(out[p:], uint32(l))
			binary.BigEndian.PutUint32(out[p+4:], e.Flags)
			last = out[p : p+8]
			descs++
		}
		if descs == 0 {
			return fmt.Errorf("block status %s: backend returned no extent at %d", sc.name, r.off)
		}
		var flags uint16
		if k == len(c.meta)-1 {
			flags = replyFlagDone
		}
		putChunkHeader(out[start:], flags, ReplyBlockStatus, r.cookie, len(out)-start-structReplyLen)
	}
	*r.buf = out
	return nil
}

// replyQueue holds replies waiting for the writer.
type replyQueue struct {
	mu      sync.Mutex
	idle    sync.Cond // writing became false (streamRest waits for it)
	q       []*request
	spare   []*request
	writing bool // a goroutine is the writer: in send's write loop, or streaming
	broken  bool // a write failed: replies are dropped from now on
	vec     [][]byte
	bufs    net.Buffers // vec, as write hands it to the socket
	flat    []byte      // over TLS: vec's small parts copied together (see write)
}

// send queues the replies of rs and, unless another goroutine is writing,
// writes every queued reply until none is left. The requests must not be
// used afterwards.
func (c *conn) send(rs ...*request) {
	w := &c.wq
	w.mu.Lock()
	w.q = append(w.q, rs...)
	if w.writing {
		w.mu.Unlock()
		return
	}
	w.writing = true
	c.writeQueued()
}

// writeQueued is the writer's loop: it writes every queued reply until none
// is left, then gives the writer's role up. It is called with wq.mu held
// by the writer and returns with it released.
func (c *conn) writeQueued() {
	w := &c.wq
	for len(w.q) > 0 {
		batch := w.q
		w.q = w.spare[:0]
		broken := w.broken
		w.mu.Unlock()
		if !broken && !c.writeBatch(batch) {
			broken = true
		}
		for i, r := range batch {
			c.release(r)
			batch[i] = nil
		}
		w.mu.Lock()
		w.broken = w.broken || broken
		w.spare = batch[:0]
	}
	w.writing = false
	w.idle.Broadcast()
	w.mu.Unlock()
}

// writeBatch sends the replies of batch in one writev; only the writer
// calls it.
func (c *conn) writeBatch(batch []*request) bool {
	vec := c.wq.vec[:0]
	for _, r := range batch {
		vec = append(vec, r.out, r.payload)
	}
	return c.write(vec)
}

// write sends vec (empty parts are skipped) in one writev; only the writer
// calls it. A failed write ends the connection.
func (c *conn) write(vec [][]byte) bool {
	n := 0
	for _, b := range vec {
		if len(b) > 0 {
			vec[n] = b
			n++
		}
	}
	c.wq.vec = vec[:n]
	var err error
	if c.tlsConn != nil {
		err = c.writeTLS(vec[:n])
	} else {
		// WriteTo consumes the slice it is called on: a field, so that no
		// slice header is allocated per batch.
		c.wq.bufs = vec[:n]
		_, err = c.wq.bufs.WriteTo(c.nc)
	}
	if err != nil {
		if c.ctx.Err() == nil {
			c.log.Debug("nbd: reply write failed", "err", err)
		}
		c.abort()
		return false
	}
	return true
}

// flatMax bounds the buffer writeTLS copies small parts into; larger parts
// go to the TLS connection as they are.
const flatMax = 64 << 10

// writeTLS writes vec over TLS. A tls.Conn has no writev: every Write is
// at least one TLS record and one write(2), so a batch of small replies
// sent part by part cost a record and a syscall per 16-byte header, which
// showed in 4 KiB random reads over TLS. Parts smaller than flatMax are
// therefore copied together and written at once.
func (c *conn) writeTLS(vec [][]byte) error {
	buf := c.wq.flat[:0]
	for _, b := range vec {
		if len(buf) > 0 && len(buf)+len(b) > flatMax {
			if _, err := c.nc.Write(buf); err != nil {
				return err
			}
			buf = buf[:0]
		}
		if len(b) < flatMax {
			buf = append(buf, b...)
			continue
		}
		if _, err := c.nc.Write(b); err != nil {
			return err
		}
	}
	c.wq.flat = buf[:0]
	if len(buf) == 0 {
		return nil
	}
	_, err := c.nc.Write(buf)
	return err
}

// streamRest sends the reply of a streamed READ whose first piece do has
// read: the header and that piece, then each further piece as it is read
// into the same buffer, then (structured) a final chunk. It writes as the
// writer, so replies queued meanwhile go out after it: a simple reply's
// data must follow its header unbroken, and the spec's "don't fragment"
// flag asks the same of a structured one. Once the header is out, a piece
// that fails to read can no longer be reported, so the connection is
// closed (the client sees the read fail).
func (c *conn) streamRest(r *request) {
	defer c.release(r)
	w := &c.wq
	w.mu.Lock()
	for w.writing && !w.broken {
		w.idle.Wait()
	}
	if w.broken {
		w.mu.Unlock()
		return
	}
	w.writing = true
	w.mu.Unlock()

	ok := c.write(append(w.vec[:0], r.out, r.payload))
	for off, end := int64(r.off)+int64(len(*r.buf)), int64(r.off)+int64(r.length); ok && off < end; {
		p := (*r.buf)[:min(int64(readChunk), end-off)]
		if err := c.exp.Backend.ReadAt(c.ctx, p, off); err != nil {
			c.failed(r, fmt.Errorf("read at %d, after %d bytes of the reply were sent: %w", off, off-int64(r.off), err))
			c.abort()
			ok = false
			break
		}
		ok = c.write(append(w.vec[:0], p))
		off += int64(len(p))
	}
	if ok && c.structured {
		h := r.hdr[:structReplyLen]
		putChunkHeader(h, replyFlagDone, ReplyNone, r.cookie, 0)
		ok = c.write(append(w.vec[:0], h))
	}
	w.mu.Lock()
	w.broken = w.broken || !ok
	c.writeQueued()
}

// release returns a request's buffer and budget.
func (c *conn) release(r *request) {
	c.s.pool.put(r.buf)
	c.budget.release(r.cost)
	c.s.mem.release(r.cost)
	c.s.putRequest(r)
}

func (s *Server) getRequest() *request {
	if r, ok := s.reqPool.Get().(*request); ok {
		return r
	}
	return new(request)
}

func (s *Server) putRequest(r *request) {
	r.reset()
	s.reqPool.Put(r)
}

// isZero reports whether p is all zero bytes.
func (s *Server) isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(s.zero))
		if !bytes.Equal(p[:n], s.zero[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// baseAllocationContext is the built-in base:allocation context: the
// backend's Extenter if it has one, else the whole range as allocated data.
type baseAllocationContext struct {
	b    Backend
	size int64
}

func (baseAllocationContext) Name() string { return baseAllocation }

func (a baseAllocationContext) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if e, ok := a.b.(Extenter); ok {
		return e.Extents(ctx, off, length)
	}
	return []Extent{{Length: length}}, nil
}
