package cow

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Held writes: persistent snapshots without synchronous first writes.
//
// NBD promises durability only after FLUSH, or for a FUA write when it
// returns, as any disk with a volatile write cache does. The crash-safety
// invariant of persistent mode is about the origin, not the reply: no origin
// modification of a cluster reaches the origin before the cluster's old data
// and map are committed in every persistent store that needs it. So a plain
// write whose clusters wait for a commit is answered as soon as
// copy-on-write has put their old data in the caches (as in transient
// mode), and its origin write is held: a goroutine of its own waits for the
// commits, lazily (waitLazy: nobody waits for the answer, so commits gather
// many clusters), and then issues it.
//
// Invariants, each kept by the code named:
//   - A held write reaches the origin only once every ticket it holds is
//     durable (or its snapshot failed and was released): issueHeld waits
//     for them first, as a waiting request does.
//   - A write is registered before it is answered (hold), and every origin
//     modification and origin read overlapping a registered write waits
//     until it is on the origin (settle, Engine.ReadAt, Engine.Extents); a
//     held write waits for the registered writes it overlaps (issueHeld).
//     So reads and block status see every answered write, and writes to one
//     range reach the origin in the order they were answered, whatever the
//     connection: multi-conn stays true.
//   - FLUSH returns only once every write registered before it is on the
//     origin and the origin was synced (Engine.Flush); an origin error of a
//     held write fails every later FLUSH, as a disk reports a lost cached
//     write.
//   - The payloads held and a fixed cost per write never exceed the budget:
//     a write that does not fit waits for its commits before its answer
//     (backpressure, not growth).
//   - A held write keeps the engine's gate shared until it is on the origin,
//     so Create, Reopen, Clear, Bookmark, Rollback and Close, which take the
//     gate exclusively, drain held writes first (lockGate hurries them):
//     the set of snapshots never changes under a held write, and a create's
//     image holds every write answered before its instant.
//
//   - A held write's payload is in the held-writes log (heldlog.go) before
//     it is answered, and marked issued only once it is on the origin, so a
//     killed process loses no answered write: its owner replays the log.
//     Without a log (UseHeldLog) writes are never held.

const (
	// heldWriteCost is what a held write costs besides its payload: its
	// goroutine, entry and channel. It bounds the number of goroutines.
	heldWriteCost = 8 << 10
	// heldIssuers bounds the held writes writing the origin at once, so
	// that a commit releasing thousands does not start as many threads.
	heldIssuers = 16
	// heldGranuleShift sizes the granules of the overlap index.
	heldGranuleShift = 20
	// holdMinSync: a snapshot whose syncs take less (tmpfs) gains
	// nothing from held writes (its commits are cheap), and the copy of the
	// payload would cost more than the wait: writes wait for it instead.
	holdMinSync = 100 * time.Microsecond
)

// heldWrite is one origin write answered before it reached the origin.
type heldWrite struct {
	off, end int64
	data     []byte // the payload, in the log's record at rec
	rec      int64
	cost     int64
	tickets  []ticket // immutable once registered
	// prev, next: the list of registered writes, in the order answered.
	prev, next *heldWrite
	done       chan struct{} // closed once on the origin (or failed)
}

// heldWrites is the engine's set of held writes.
type heldWrites struct {
	log     *HeldLog
	budget  int64         // the log's size; 0 (no log): never hold
	minSync int64         // nanoseconds: holdMinSync (tests hold whatever the sync costs)
	issuing chan struct{} // semaphore of heldIssuers
	// blocked > 0: a change of the snapshot set is draining the gate;
	// nothing new is held meanwhile (see Engine.lockGate).
	blocked atomic.Int32
	n       atomic.Int64 // writes registered: lock-free "nothing held"
	total   atomic.Int64 // writes ever held

	mu         sync.Mutex
	head, tail *heldWrite
	granules   map[int64][]*heldWrite // overlap index: granule → writes touching it
	bytes      int64                  // cost registered
	err        error                  // the first origin error of a held write; sticky
}

func (h *heldWrites) init() {
	h.minSync = int64(holdMinSync)
	h.issuing = make(chan struct{}, heldIssuers)
	h.granules = make(map[int64][]*heldWrite)
}

// granules calls fn for each granule of [off, end).
func granulesOf(off, end int64, fn func(g int64)) {
	for g := off >> heldGranuleShift; g <= (end-1)>>heldGranuleShift; g++ {
		fn(g)
	}
}

// overlapsLocked appends to dst the registered writes overlapping
// [off, end), each once, in the order answered within each granule.
func (h *heldWrites) overlapsLocked(dst []*heldWrite, off, end int64) []*heldWrite {
	granulesOf(off, end, func(g int64) {
		for _, w := range h.granules[g] {
			if w.off < end && off < w.end && !containsWrite(dst, w) {
				dst = append(dst, w)
			}
		}
	})
	return dst
}

func containsWrite(ws []*heldWrite, w *heldWrite) bool {
	for _, x := range ws {
		if x == w {
			return true
		}
	}
	return false
}

// hold registers a write of p at off as held, unless it is not worth it or
// does not fit; it reports whether it did. On true the write is answered
// and issueHeld owns r's tickets, the gate's shared hold and the payload.
func (e *Engine) hold(r *cowReq, p []byte, off int64) bool {
	h := &e.held
	if h.budget == 0 || len(r.tickets) == 0 || len(p) == 0 || h.blocked.Load() > 0 || e.active() != nil {
		return false
	}
	for _, t := range r.tickets {
		if t.s.commits.syncCost.Load() < h.minSync {
			return false
		}
	}
	cost := int64(len(p)) + heldWriteCost
	w := &heldWrite{off: off, end: off + int64(len(p)), cost: cost, done: make(chan struct{})}
	w.tickets = append(w.tickets, r.tickets...)
	h.mu.Lock()
	if h.bytes+cost > h.budget {
		h.mu.Unlock()
		return false
	}
	rec, data, ok := h.log.alloc(len(p), off)
	if !ok {
		h.mu.Unlock()
		return false
	}
	w.rec, w.data = rec, data
	h.bytes += cost
	pressed := h.bytes > h.budget/2
	before := h.overlapsLocked(nil, w.off, w.end)
	granulesOf(w.off, w.end, func(g int64) { h.granules[g] = append(h.granules[g], w) })
	w.prev = h.tail
	if h.tail != nil {
		h.tail.next = w
	} else {
		h.head = w
	}
	h.tail = w
	h.n.Add(1)
	h.mu.Unlock()
	// The copy is taken after registering, before the answer: nobody
	// can see the write on the origin until done is closed.
	copy(w.data, p)
	h.log.publish(w.rec)
	h.total.Add(1)
	if pressed || h.blocked.Load() > 0 {
		// Half the budget is held: commit now rather than when the
		// cache or the timer asks, so that writes keep being held. Or
		// lockGate began after the check above and may have missed w.
		w.hurry()
	}
	go e.issueHeld(w, before)
	return true
}

// issueHeld waits for w's commits and for the held writes w overlaps, then
// writes w to the origin and releases the gate's shared hold that admit
// took for it.
func (e *Engine) issueHeld(w *heldWrite, before []*heldWrite) {
	defer e.gate.RUnlock()
	for _, t := range w.tickets {
		t.s.commits.waitLazy(t.seq)
	}
	for _, b := range before {
		<-b.done
	}
	h := &e.held
	h.issuing <- struct{}{}
	_, err := e.origin.WriteAt(w.data, w.off)
	<-h.issuing
	// Marked issued even when the write failed: its error fails every
	// later FLUSH, and a record that stayed would stop the ring.
	h.log.issued(w.rec)
	h.mu.Lock()
	if err != nil && h.err == nil {
		// Logged once: every later FLUSH fails from here on anyway, and
		// a dead origin would otherwise log a line per held write.
		h.err = fmt.Errorf("cow: write origin at %d (held write): %w", w.off, err)
		e.log.Error("a held write failed: every later flush fails", "offset", w.off, "length", w.end-w.off, "err", h.err)
	}
	granulesOf(w.off, w.end, func(g int64) {
		ws := h.granules[g]
		for i, x := range ws {
			if x == w {
				ws = append(ws[:i], ws[i+1:]...)
				break
			}
		}
		if len(ws) == 0 {
			delete(h.granules, g)
		} else {
			h.granules[g] = ws
		}
	})
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		h.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		h.tail = w.prev
	}
	h.bytes -= w.cost
	h.n.Add(-1)
	h.mu.Unlock()
	close(w.done)
}

// hurry asks w's snapshots to commit now.
func (w *heldWrite) hurry() {
	for _, t := range w.tickets {
		t.s.commits.hurry(t.seq)
	}
}

// waitOverlaps waits until no write registered now and overlapping
// [off, off+n) is held, hurrying their commits: the caller (a read, or an
// origin modification that is not held) must come after them.
func (h *heldWrites) waitOverlaps(off, n int64) {
	if h.n.Load() == 0 || n <= 0 {
		return
	}
	h.mu.Lock()
	ws := h.overlapsLocked(nil, off, off+n)
	h.mu.Unlock()
	waitWrites(ws)
}

// drain waits until every write registered now is on the origin, hurrying
// their commits, and returns the first origin error of a held write.
func (h *heldWrites) drain() error {
	waitWrites(h.registered())
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// registered lists the writes registered now, in the order answered.
func (h *heldWrites) registered() []*heldWrite {
	if h.n.Load() == 0 {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var ws []*heldWrite
	for w := h.head; w != nil; w = w.next {
		ws = append(ws, w)
	}
	return ws
}

func waitWrites(ws []*heldWrite) {
	for _, w := range ws {
		w.hurry()
	}
	for _, w := range ws {
		<-w.done
	}
}

// UseHeldLog makes the engine hold writes, in l: from here on l's size is
// the budget of held writes. The owner replays what a previous process
// left in the log (ReadHeldLog) before, and closes l after Close.
func (e *Engine) UseHeldLog(l *HeldLog) {
	e.lockGate()
	defer e.gate.Unlock()
	e.held.log = l
	e.held.budget = l.Size()
}

// HeldInfo reports the held writes.
type HeldInfo struct {
	Budget int64 // the most they may cost; 0: writes are never held
	Bytes  int64 // what the writes held now cost (payload and a fixed cost each)
	Writes int64 // writes held now
	Total  int64 // writes ever held
	Failed bool  // a held write could not be written: every FLUSH fails
}

// Held reports the held writes.
func (e *Engine) Held() HeldInfo {
	h := &e.held
	h.mu.Lock()
	defer h.mu.Unlock()
	return HeldInfo{Budget: h.budget, Bytes: h.bytes, Writes: h.n.Load(), Total: h.total.Load(), Failed: h.err != nil}
}

// lockGate takes the gate exclusively for a change of the snapshot set.
// It drains held writes first: it stops holding new ones and hurries the
// commits of those held, which keep the gate shared until they are on the
// origin.
func (e *Engine) lockGate() {
	h := &e.held
	h.blocked.Add(1)
	defer h.blocked.Add(-1)
	for _, w := range h.registered() {
		w.hurry()
	}
	e.gate.Lock()
}

// lockGateCtx is lockGate bounded by ctx: if ctx ends first, it gives up
// and returns ctx's error; the goroutine waiting for the gate then releases
// it as soon as it gets it. (While it waits, new requests wait behind it,
// as they would behind the create itself: that is the cost of a create
// instant.)
func (e *Engine) lockGateCtx(ctx context.Context) error {
	if ctx.Done() == nil {
		e.lockGate()
		return nil
	}
	locked := make(chan struct{})
	go func() {
		e.lockGate()
		close(locked)
	}()
	select {
	case <-locked:
		return nil
	case <-ctx.Done():
		go func() {
			<-locked
			e.gate.Unlock()
		}()
		return ctx.Err()
	}
}
