package nbdsrv

import (
	"sync"
	"sync/atomic"
	"time"
)

// Running requests on the reader. Handing a request to a worker costs a
// goroutine wake-up, often on another core, plus the scheduler work around
// it; for a backend that answers from the page cache in a few microseconds
// that is more than the I/O itself (a 4 KiB request spent a large share
// of the server's CPU in the scheduler). So the reader runs a short request
// itself while the backend answers fast, and holds its reply until it has
// no further request buffered, so that a burst of pipelined requests costs
// one socket read and one writev.
//
// A request run on the reader delays every request behind it, which is
// wrong for a slow backend (a disk, a network, writes that wait for a
// sync): there, parallel workers are the point. So the
// connection keeps a moving average of how long the backend takes for
// such short requests, wherever they run, and the reader runs them only
// while that average is under inlineSlow. Samples are clipped, so that a
// rare outlier (the reader preempted, a page fault) does not switch modes:
// it takes about five slow requests in a row to move a fast average over
// the line. Requests run by workers keep the average current, so a
// backend that turns fast again is noticed without probing.
const (
	inlineMaxLen = 64 << 10
	inlineSlow   = 25 * time.Microsecond

	// A burst's held replies are sent when they reach either bound, so the
	// first reply of a long burst is not kept waiting for the last, and a
	// client at queue depth 32 gets replies (and sends new requests) while
	// the rest of its burst runs, rather than the two taking turns.
	maxHeld      = 16
	maxHeldBytes = 256 << 10
)

// inlineCandidate reports whether a request may run on the reader: a short
// read, write, trim or zeroing that does not ask for durability (FLUSH and
// FUA wait for a sync).
func inlineCandidate(ri reqInfo) bool {
	switch ri.cmd {
	case CmdRead, CmdWrite, CmdTrim, CmdWriteZeroes:
		return ri.flags&FlagFUA == 0 && ri.length <= inlineMaxLen
	}
	return false
}

// serviceTime is a moving average (weight 1/8) of the backend's time for
// inline candidates, in nanoseconds. The reader and the workers update it
// without a lock; an update lost to a concurrent one is harmless.
type serviceTime struct{ ns atomic.Int64 }

func (s *serviceTime) observe(d time.Duration) {
	d = min(d, 2*inlineSlow)
	old := s.ns.Load()
	s.ns.Store(old + (int64(d)-old)/8)
}

func (s *serviceTime) fast() bool { return s.ns.Load() < int64(inlineSlow) }

// Still, a request the reader runs may take long, or never end (a backend
// that waits for a later request of the same connection, a hung disk):
// nobody would read the connection meanwhile, so further requests would
// wait, and a client that disconnects would go unnoticed, its requests'
// contexts never cancelled. So a watchdog timer ticks every inlineRescue
// while the reader runs requests; a request it finds running at two ticks
// in a row has run for longer than inlineRescue, and the watchdog starts a
// new goroutine that reads on; the old one, once its request is done,
// sends the reply and ends its turn. (A timer armed per request would do
// it too, but arming one wakes the runtime's network poller thread: a
// context switch per request, which cost much of the throughput.)
//
// The hand-over: each turn of reading has a readTurn whose state the
// reader sets to turnInline for the duration of a request; the watchdog
// takes over only by moving it from turnInline to turnOver, and the
// reader keeps reading only by moving it back from turnInline to
// turnReading. Exactly one of the two succeeds, so exactly one goroutine
// reads, and the reader's state (the connReader, the held replies)
// passes from one to the other through that atomic state. A turn taken
// over never comes back.
const inlineRescue = time.Millisecond

const (
	turnReading int32 = iota
	turnInline
	turnOver
)

type readTurn struct {
	state   atomic.Int32
	started atomic.Uint64 // requests run on this turn
}

// watchdog is the per-connection state of the rescue timer.
type watchdog struct {
	timer *time.Timer
	// ticking: the timer is armed, or a tick is running and will decide
	// whether to rearm it.
	ticking atomic.Bool

	mu       sync.Mutex // held by tick: ticks never overlap, but see ticking
	seenTurn *readTurn  // what the last tick saw
	seenN    uint64
}

// runInline runs r on the reader and holds its reply. It reports false if
// the reading was taken over meanwhile: the reply has then been sent, and
// the caller's turn is over.
func (c *conn) runInline(t *readTurn, r *request) bool {
	t.started.Add(1)
	t.state.Store(turnInline)
	if !c.dog.ticking.Load() && c.dog.ticking.CompareAndSwap(false, true) {
		c.dog.timer.Reset(inlineRescue)
	}
	ok := c.timedHandle(r)
	if !t.state.CompareAndSwap(turnInline, turnReading) {
		if ok {
			c.send(r)
		}
		return false
	}
	if ok {
		c.hold(r)
	}
	return true
}

// tick is the watchdog timer's function. It rearms the timer while the
// reader runs requests, and stops when none started since the last tick.
func (c *conn) tick() {
	d := &c.dog
	d.mu.Lock()
	defer d.mu.Unlock()
	t := c.turn.Load()
	n := t.started.Load()
	if t == d.seenTurn && n == d.seenN && t.state.CompareAndSwap(turnInline, turnOver) {
		// The request running at the last tick still is: read on, in
		// new memory, as the request may be writing its payload from
		// the old (connReader.Next). The old turn no longer touches
		// c.br, and wrote it before it set turnInline.
		c.br.Resize(len(c.br.buf))
		t = new(readTurn)
		c.turn.Store(t)
		c.inflight.Add(1)
		go c.read(t)
		n = 0
	}
	idle := t == d.seenTurn && n == d.seenN
	d.seenTurn, d.seenN = t, n
	if !idle {
		d.timer.Reset(inlineRescue)
		return
	}
	d.ticking.Store(false)
	// A request that started after the loads above may have found
	// ticking still set and left the timer alone: then rearm it here.
	if (t.started.Load() != n || t.state.Load() == turnInline) && d.ticking.CompareAndSwap(false, true) {
		d.timer.Reset(inlineRescue)
	}
}

// timedHandle is handle, timing an inline candidate into c.service and
// every request into Config.Observe when it is set.
func (c *conn) timedHandle(r *request) bool {
	obs := c.s.cfg.Observe
	inline := inlineCandidate(r.reqInfo)
	if obs == nil && !inline {
		return c.handle(r)
	}
	start := time.Now()
	ok := c.handle(r)
	d := time.Since(start)
	if inline {
		c.service.observe(d)
	}
	if obs != nil && ok {
		obs(c.exp.Name, r.cmd, payloadBytes(r.reqInfo), d, r.errno)
	}
	return ok
}

// payloadBytes is what Config.Observe reports as a request's bytes.
func payloadBytes(ri reqInfo) int {
	if ri.cmd == CmdRead || ri.cmd == CmdWrite {
		return int(ri.length)
	}
	return 0
}

// hold keeps r's reply for the reader's next flushHeld.
func (c *conn) hold(r *request) {
	c.held = append(c.held, r)
	c.heldBytes += len(r.payload)
	if len(c.held) >= maxHeld || c.heldBytes >= maxHeldBytes {
		c.flushHeld()
	}
}

// flushHeld queues the held replies for writing, and writes them unless a
// worker is writing already (it then sends them with its next batch).
func (c *conn) flushHeld() {
	if len(c.held) == 0 {
		return
	}
	c.send(c.held...)
	clear(c.held)
	c.held, c.heldBytes = c.held[:0], 0
}
