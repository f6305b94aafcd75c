package cow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
)

// slotState is a cache slot's state (fss: FSS_CACHE_FREE / BUSY / VALID).
type slotState uint8

const (
	slotFree       slotState = iota
	slotBusy                 // reserved; the origin read is in progress
	slotValid                // holds the old data; waiting for a commit
	slotCommitting           // in a batch being committed
)

// slot is one cache slot. Its fields are guarded by the snapshot's mu; buf
// is immutable while the slot is VALID or committing.
type slot struct {
	cluster uint32
	state   slotState
	seq     uint64 // publication number, for commit waits
	buf     *clusterBuf
}

// Snapshot is one frozen image of the origin.
type Snapshot struct {
	e          *Engine
	name       string
	id         uint64 // creation order within the engine
	geo        geometry
	persistent bool
	st         clusterStore
	hdr        storeHeader
	pool       *bufPool
	log        *slog.Logger
	pause      time.Duration // how long the create instant held requests
	nslots     int           // cache slots

	// copied is fss's sc_copied: bit c is set, under mu, once cluster
	// c's old data is VALID in the cache; it is never cleared. Reads
	// load it without mu.
	copied bitmap
	// validSeq counts publications; durableSeq is the highest one
	// committed. Both are written under mu and read without it by the
	// fast path (see settled).
	validSeq, durableSeq atomic.Uint64
	invalid              atomic.Bool // set under mu, never cleared
	// released: requests may modify the origin without copying for this
	// snapshot. For a transient snapshot it is set with invalid; for a
	// persistent one only after the writer tried to record the
	// invalidation (see recordInvalid).
	released atomic.Bool
	closed   atomic.Bool // reads refused: the snapshot was cleared or the engine closed
	// bookmark: the store dropped its data (Engine.Bookmark); the snapshot
	// only records which clusters the origin wrote, and reads are refused.
	// Set with the engine's gate held exclusively, never cleared.
	bookmark atomic.Bool

	mu       sync.Mutex
	slotCond sync.Cond // a slot was freed or a BUSY cluster resolved (cowwait2, cowwait3)
	durCond  sync.Cond // durableSeq advanced, or the snapshot failed
	workCond sync.Cond // the writer has work: pending, stop, a reason to persist
	slots    []slot
	free     []*slot
	cached   map[uint32]*slot // clusters in BUSY, VALID or committing slots
	pending  []*slot          // VALID slots in publication order
	copiedN  int64
	reason   string
	// persistReason asks the writer to record the invalidation in the
	// store.
	persistReason bool
	stopping      bool
	discard       bool // stopping without committing what is cached (Clear)
	done          chan struct{}
	// givenUp is closed by abandon, under mu: the engine stopped waiting
	// for this snapshot's store, so stop no longer waits for its writer
	// or a commit in progress, either of which may be inside a store call
	// that never returns.
	givenUp chan struct{}
	// committing: a commit (or the recording of an invalidation) is in
	// progress; batch and clusters belong to it.
	committing bool
	batch      []*slot
	clusters   []storeCluster
	// Group commit state (see linger): the last commit's sync time, the
	// clusters the next batch may gather, and the wait for them.
	lastSync    time.Duration
	expect      int
	lingering   bool
	lingerUp    bool
	lingerCond  sync.Cond
	lingerTimer *time.Timer
	// syncCost is the commits' sync time in nanoseconds, averaged (see
	// commitLocked), read without mu by Engine.hold.
	syncCost atomic.Int64
	// Lazy commits (waitLazy): held writes waiting, a commit asked for
	// now (hurry), the held writes' delay expired, and its timer.
	lazyWaiters int
	hurried     bool
	lazyDue     bool
	lazyArmed   bool
	lazyTimer   *time.Timer

	// life is held shared by reads and exclusively by stop, so the store
	// is not closed under a read.
	life sync.RWMutex

	stats counters
}

type counters struct {
	cowCalls, clustersCopied, cacheFullWaits atomic.Int64
	mapReads, mapWrites, bytesCopied         atomic.Int64
	batches, syncs                           atomic.Int64
	// commitBuckets[i] counts successful commits that took at most
	// commitBounds[i] (the last one: longer); commitNanos sums their
	// durations. Kept here, and not handed to a hook, so that a scrape
	// reads them like every other counter and the writer pays two atomic
	// adds per commit.
	commitBuckets [len(commitBounds) + 1]atomic.Int64
	commitNanos   atomic.Int64
}

// commitBounds are the upper bounds of the commit latency buckets: from a
// tmpfs store's tens of microseconds to a stalled disk's seconds.
var commitBounds = [...]time.Duration{
	50 * time.Microsecond, 100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond,
}

// observeCommit records one successful commit's duration.
func (c *counters) observeCommit(d time.Duration) {
	i := 0
	for i < len(commitBounds) && d > commitBounds[i] {
		i++
	}
	c.commitBuckets[i].Add(1)
	c.commitNanos.Add(int64(d))
}

// commitLatency reads the commit latency histogram.
func (c *counters) commitLatency() Histogram {
	h := Histogram{
		Bounds: commitBounds[:],
		Counts: make([]int64, len(commitBounds)+1),
		Sum:    time.Duration(c.commitNanos.Load()),
	}
	for i := range c.commitBuckets {
		h.Counts[i] = c.commitBuckets[i].Load()
	}
	return h
}

func (e *Engine) newSnapshot(name string, st clusterStore, geo geometry, persistent bool, nslots int) *Snapshot {
	s := &Snapshot{
		e:          e,
		name:       name,
		geo:        geo,
		persistent: persistent,
		st:         st,
		hdr:        st.header(),
		pool:       e.bufPool(geo.csize),
		nslots:     nslots,
		log:        e.log.With("snapshot", name),
		copied:     newBitmap(geo.count),
		slots:      make([]slot, nslots),
		free:       make([]*slot, nslots),
		cached:     make(map[uint32]*slot, nslots),
		pending:    make([]*slot, 0, nslots),
		done:       make(chan struct{}),
		givenUp:    make(chan struct{}),
	}
	for i := range s.slots {
		s.free[i] = &s.slots[i]
	}
	s.pool.reserve(nslots)
	s.slotCond.L = &s.mu
	s.durCond.L = &s.mu
	s.workCond.L = &s.mu
	s.lingerCond.L = &s.mu
	s.batch = make([]*slot, 0, nslots)
	s.clusters = make([]storeCluster, 0, nslots)
	return s
}

// settled reports, without locking, that a request has nothing to do for
// cluster c in s: s failed and was released, or c is copied and (transient, or everything
// published is committed). The copied bit is loaded before the sequence
// numbers: c's sequence number is at most validSeq at that point, and
// durableSeq never decreases.
func (s *Snapshot) settled(c uint32) bool {
	if s.released.Load() {
		return true
	}
	if s.invalid.Load() || !s.copied.get(c) {
		return false
	}
	return !s.persistent || s.durableSeq.Load() >= s.validSeq.Load()
}

// waitDurable blocks until publication seq is committed, the snapshot
// failed and was released, or it is stopping; seq math.MaxUint64 waits
// for the release of an invalid snapshot.
func (s *Snapshot) waitDurable(seq uint64) {
	if s.durableSeq.Load() >= seq || s.released.Load() {
		return
	}
	s.mu.Lock()
	led := false
	for s.durableSeq.Load() < seq && !s.released.Load() && !s.stopping {
		if s.persistent && !s.committing && !s.persistReason && len(s.pending) > 0 {
			// Lead: commit what is pending (ours included) here
			// rather than wake the writer and wait to be woken.
			s.commitLocked(true)
			led = true
			continue
		}
		s.durCond.Wait()
	}
	handOver := led && len(s.pending) > 0
	s.mu.Unlock()
	if handOver {
		// Requests are waiting to commit the next batch, and the end of
		// our commit made them runnable on this P, behind us. Without
		// yielding, one of them runs only once we block (our origin
		// write and next read are short syscalls that keep the P), and
		// the store sat idle after such commits for tens of times longer
		// than with the yield (measured with 4 writers on /dev/shm).
		runtime.Gosched()
	}
}

// holdDelay is the longest a held write waits for a commit nobody asked
// for: commits of held writes are otherwise due when half the cache waits
// for one, when the held writes' budget is half used, or when a read, a
// flush or a change of the snapshot set waits for them (hurry).
const holdDelay = 5 * time.Millisecond

// waitLazy is waitDurable for a held write: its answer is sent, so it does
// not lead a commit at once but when one is due (lazyDueLocked), and so
// commits gather many clusters and sync once for all of them.
func (s *Snapshot) waitLazy(seq uint64) {
	if s.durableSeq.Load() >= seq || s.released.Load() {
		return
	}
	s.mu.Lock()
	for s.durableSeq.Load() < seq && !s.released.Load() && !s.stopping {
		if !s.committing && !s.persistReason && len(s.pending) > 0 && s.lazyDueLocked() {
			s.commitLocked(false)
			continue
		}
		if !s.lazyArmed {
			s.lazyArmed = true
			if s.lazyTimer == nil {
				s.lazyTimer = time.AfterFunc(holdDelay, s.lazyExpired)
			} else {
				s.lazyTimer.Reset(holdDelay)
			}
		}
		s.lazyWaiters++
		s.durCond.Wait()
		s.lazyWaiters--
	}
	s.mu.Unlock()
}

func (s *Snapshot) lazyExpired() {
	s.mu.Lock()
	s.lazyArmed = false
	s.lazyDue = true
	s.durCond.Broadcast()
	s.mu.Unlock()
}

// lazyDueLocked reports whether the held writes' commit is due.
func (s *Snapshot) lazyDueLocked() bool {
	return s.hurried || s.lazyDue || len(s.free) <= s.nslots/2
}

// hurry asks for a commit of publication seq now, for a held write that a
// read, a flush or a change of the snapshot set waits for.
func (s *Snapshot) hurry(seq uint64) {
	if s.durableSeq.Load() >= seq || s.released.Load() {
		return
	}
	s.mu.Lock()
	if s.durableSeq.Load() < seq {
		s.hurried = true
		s.durCond.Broadcast()
	}
	s.mu.Unlock()
}

// failLocked is fss_error: the snapshot becomes invalid with a reason.
// The writer drops what it holds and records the reason (recordInvalid);
// then waiters are released (origin requests go on without it). A
// transient snapshot is released at once.
func (s *Snapshot) failLocked(reason string) {
	if s.invalid.Load() {
		return
	}
	s.reason = reason
	s.invalid.Store(true)
	s.persistReason = true
	if !s.persistent {
		s.released.Store(true)
	}
	s.log.Error("snapshot invalid", "reason", reason)
	s.slotCond.Broadcast()
	s.durCond.Broadcast()
	s.workCond.Signal()
	s.lingerCond.Signal()
}

func (s *Snapshot) start() { go s.run() }

// run is the writer goroutine (fss_bs_thread): it drains VALID slots to the
// store, all pending clusters in one commit (one sync in persistent mode),
// records an invalidation (recordInvalid) before releasing the snapshot,
// and on stop commits (or, for Clear, drops) what is left.
//
// In persistent mode a request waiting for its commit may run the commit
// itself when no commit is in progress (waitDurable): that saves two
// goroutine handoffs per first write. The committing flag keeps the store
// single-writer either way.
func (s *Snapshot) run() {
	defer close(s.done)
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		switch {
		case s.committing:
			// A request is committing; it signals when done.
		case s.persistReason:
			s.persistReason = false
			s.committing = true
			reason := s.reason
			s.mu.Unlock()
			s.recordInvalid(reason)
			s.mu.Lock()
			s.committing = false
			s.released.Store(true)
			s.durCond.Broadcast()
			continue
		case len(s.pending) > 0 && (s.lazyWaiters == 0 || s.stopping || s.lazyDueLocked()):
			// Pending clusters that only held writes wait for are
			// committed when due (waitLazy); those of waiting requests
			// now.
			s.commitLocked(true)
			continue
		case s.stopping:
			return
		}
		s.workCond.Wait()
	}
}

// recordInvalid records the invalidation of s, with mu not held: in the
// store's header and, for a persistent snapshot, in its owner's record
// (EngineOptions.RecordInvalid). run releases s only after it returned.
//
// Invariant: before any origin write goes on without copying for a
// persistent snapshot, its invalidation is durable in at least one of the
// two places, so a crash cannot leave a snapshot that reopens as valid while
// the origin moved on uncopied. Both are tried whatever the other did. If
// both fail (or the store fails and there is no owner's record), the
// invariant is broken and that is logged as an error; s is released anyway,
// because the origin must never be blocked or fail because a snapshot
// failed. The one other place that releases a persistent snapshot,
// abandon (a stop that ran out of time), keeps the invariant without
// exception: it releases s only once the owner's record has it.
func (s *Snapshot) recordInvalid(reason string) {
	storeErr := s.st.invalidate(reason)
	if !s.persistent {
		// A transient store is never reopened: its header is only for
		// whoever reads it while the snapshot lives.
		if storeErr != nil {
			s.log.Warn("cannot record the invalidation in the store", "reason", reason, "err", storeErr)
		}
		return
	}
	if s.e.recordInvalid == nil {
		if storeErr != nil {
			s.log.Error("cannot record the invalidation in the store: reopening it after a crash would serve stale data",
				"reason", reason, "err", storeErr)
		}
		return
	}
	recordErr := s.e.recordInvalid(s.name, reason)
	switch {
	case storeErr != nil && recordErr != nil:
		s.log.Error("cannot record the invalidation in the store nor in the owner's record: reopening it after a crash would serve stale data",
			"reason", reason, "store_err", storeErr, "record_err", recordErr)
	case storeErr != nil:
		s.log.Warn("cannot record the invalidation in the store; the owner's record has it",
			"reason", reason, "err", storeErr)
	case recordErr != nil:
		s.log.Warn("cannot record the invalidation in the owner's record; the store has it",
			"reason", reason, "err", recordErr)
	}
}

// heldUpLocked reports whether s's store has not caught up with the origin
// requests: a commit is in progress, clusters wait for one, or an
// invalidation waits to be recorded. While that is so, origin requests may
// be waiting for s (a commit, cache space, the invalidation's record). A
// transient snapshot's pending clusters count too: they hold cache slots
// that requests may be waiting for.
func (s *Snapshot) heldUpLocked() bool {
	return !s.released.Load() && (s.committing || len(s.pending) > 0 || s.persistReason || s.invalid.Load())
}

// abandon is Engine.Abandon for one snapshot: if its store has not caught
// up, s turns invalid for reason and, once that is recorded, its waiting
// requests are released. It reports whether it invalidated s; an error
// means s is held up and could not be released.
//
// abandon never touches the store: the writer, or a request leading a
// commit, may be inside a store call that never returns, and store writes
// are single-writer (the committing flag). So a
// persistent snapshot's invalidation is recorded by the owner's record
// alone (EngineOptions.RecordInvalid), on the caller's goroutine, and s is
// released only if that succeeded: the invariant of recordInvalid holds.
// When it fails, unlike a failure while the daemon runs, s is not released
// anyway: the requests waiting for it have not touched the origin, the
// owner is stopping and cuts their connections, and the store, which
// nobody wrote behind its back, still holds a right snapshot. (If the
// writer is free, it records the invalidation as for any failure, the
// store header included, and releases s itself.)
func (s *Snapshot) abandon(reason string) (bool, error) {
	s.mu.Lock()
	if !s.heldUpLocked() {
		s.mu.Unlock()
		return false, nil
	}
	s.failLocked(reason) // keeps the first reason if s already failed
	reason = s.reason
	select {
	case <-s.givenUp:
	default:
		close(s.givenUp)
	}
	s.durCond.Broadcast() // stop may be waiting for a commit in progress
	persistent := s.persistent
	s.mu.Unlock()
	if !persistent {
		return true, nil // failLocked released it: nothing to record
	}
	if s.e.recordInvalid == nil {
		return false, fmt.Errorf("cow: snapshot %q: its store has not caught up and there is no owner's record to invalidate it in: the origin requests waiting for it wait for the store", s.name)
	}
	if err := s.e.recordInvalid(s.name, reason); err != nil {
		return false, fmt.Errorf("cow: snapshot %q: its store has not caught up and its invalidation cannot be recorded (%w): the origin requests waiting for it wait for the store", s.name, err)
	}
	s.mu.Lock()
	s.released.Store(true)
	s.durCond.Broadcast()
	s.mu.Unlock()
	return true, nil
}

// commitLocked commits every pending cluster as one batch. It is called
// with mu held and no commit in progress, by the writer or by a request
// (waitDurable), and releases mu during the store I/O. A slot is freed, and
// its cluster removed from cached, only after the commit returned: by then
// the store can find it, so a read that misses the cache finds the cluster
// in the store.
func (s *Snapshot) commitLocked(linger bool) {
	s.committing = true
	defer func() {
		s.committing = false
		s.durCond.Broadcast()
		if len(s.pending) > 0 || s.stopping || s.persistReason {
			// The writer may be waiting for this commit to end (run);
			// it has nothing to do otherwise, and waking it after every
			// commit a request led costs a futex wake-up per first write.
			s.workCond.Signal()
		}
	}()
	if s.persistent && linger {
		s.linger()
	}
	s.hurried, s.lazyDue = false, false
	batch := append(s.batch[:0], s.pending...)
	clear(s.pending)
	s.pending = s.pending[:0]
	if len(batch) == 0 {
		return
	}
	if s.invalid.Load() || s.discard {
		s.dropLocked(batch)
		return
	}
	for _, sl := range batch {
		sl.state = slotCommitting
	}
	top := batch[len(batch)-1].seq
	s.mu.Unlock()

	clusters := s.clusters[:0]
	for _, sl := range batch {
		clusters = append(clusters, storeCluster{index: sl.cluster, data: sl.buf.data})
	}
	start := time.Now()
	syncTime, err := s.st.commit(clusters)
	took := time.Since(start)
	clear(clusters)

	s.mu.Lock()
	// The requests this commit releases will likely come back with their
	// next clusters, while those that arrived during it wait (see linger).
	s.expect, s.lastSync = len(batch)+len(s.pending), syncTime
	// A moving average (weight 1/8 for the new sample), so that one slow
	// sync of a fast store does not make writes held, nor one fast sync of
	// a slow store stop it.
	if c := s.syncCost.Load(); c == 0 {
		s.syncCost.Store(int64(syncTime))
	} else {
		s.syncCost.Store(c + (int64(syncTime)-c)/8)
	}
	if err != nil {
		s.failLocked(fmt.Sprintf("write backing store: %v", err))
	} else {
		s.stats.batches.Add(1)
		s.stats.observeCommit(took)
		if s.persistent {
			s.stats.syncs.Add(1)
		}
		s.stats.mapWrites.Add(int64(len(batch)))
		s.durableSeq.Store(top)
	}
	s.dropLocked(batch)
	s.batch, s.clusters = batch[:0], clusters[:0]
}

// Group commit tuning. With concurrent writers, batches tend to alternate
// between two halves of them (one half waits on commit k while the other
// gathers for k+1). When a sync is expensive (a disk), the committer
// therefore lingers a little for the requests the last commit released:
// until the batch has as many clusters as the last commit plus those that
// arrived during it, for at most half the last sync's duration. A lone
// writer (batches of one) never lingers; nor does a store whose syncs are
// cheap, however long its commits take: a commit that is long because it
// writes much data (large batches on tmpfs) gains nothing from waiting, and
// lingering there left the store idle for about half of each commit
// (measured with 16 writers on /dev/shm).
const (
	lingerThreshold = 200 * time.Microsecond
	maxLinger       = time.Millisecond
)

// lingerFor is how long a commit may wait for more clusters, given the
// last commit's sync time, the clusters pending and those expected.
func lingerFor(lastSync time.Duration, pending, expect int) time.Duration {
	if lastSync < lingerThreshold || pending >= expect || expect < 2 {
		return 0
	}
	return min(lastSync/2, maxLinger)
}

// linger waits (with mu held, releasing it while waiting) for the pending
// batch to reach s.expect clusters; see lingerFor.
func (s *Snapshot) linger() {
	d := lingerFor(s.lastSync, len(s.pending), s.expect)
	if d == 0 {
		return
	}
	s.lingerUp = false
	s.lingering = true
	if s.lingerTimer == nil {
		s.lingerTimer = time.AfterFunc(d, func() {
			s.mu.Lock()
			s.lingerUp = true
			s.lingerCond.Signal()
			s.mu.Unlock()
		})
	} else {
		s.lingerTimer.Reset(d)
	}
	for len(s.pending) < s.expect && len(s.free) > 0 && !s.lingerUp && !s.stopping && !s.invalid.Load() && !s.persistReason {
		s.lingerCond.Wait()
	}
	s.lingering = false
	s.lingerTimer.Stop()
}

// dropLocked frees committed (or abandoned) slots.
func (s *Snapshot) dropLocked(batch []*slot) {
	for _, sl := range batch {
		delete(s.cached, sl.cluster)
		sl.buf.release()
		sl.buf, sl.state = nil, slotFree
		s.free = append(s.free, sl)
	}
	clear(batch)
	s.slotCond.Broadcast()
}

// stop ends copy-on-write for s (the caller already removed it from the
// engine's set), stops the writer after it committed what it holds (or
// dropped it, when discard), waits for reads in flight and closes the
// store. For a snapshot the engine gave up on (abandon) it waits for
// nothing and leaves the store open: see the comment below.
func (s *Snapshot) stop(discard bool) error {
	s.mu.Lock()
	s.stopping = true
	s.discard = discard
	if discard {
		// Reads fail as cleared from here on: the writer is about to
		// drop cached copies without committing them, and a read that
		// then missed the cache would find nothing in the store and
		// report a copied cluster as missing.
		s.closed.Store(true)
	}
	s.slotCond.Broadcast()
	s.durCond.Broadcast()
	s.workCond.Signal()
	s.lingerCond.Signal()
	s.mu.Unlock()
	select {
	case <-s.done:
	case <-s.givenUp:
	}
	s.mu.Lock()
	for s.committing && !s.gaveUp() { // a request's commit that began before stopping
		s.durCond.Wait()
	}
	s.mu.Unlock()
	s.closed.Store(true)
	if s.gaveUp() {
		// The writer or a commit may be inside a store call that never
		// returns (a stalled disk). Closing the store would wait for it
		// (and write a clean mark to that disk), and the memory may still
		// be in use by it: leave both to the owner's exit. The snapshot
		// is invalid; its owner's record says so, or else abandon did not
		// release it, and no origin write went on without copying for it.
		s.log.Warn("store left open: the engine gave up waiting for it")
		return nil
	}
	s.life.Lock()
	defer s.life.Unlock()
	// Release the memory: no request can reach s any more (it left the
	// engine's set first), and reads now fail before touching these.
	s.mu.Lock()
	s.copied, s.slots, s.free, s.cached, s.pending, s.batch, s.clusters = nil, nil, nil, nil, nil, nil, nil
	s.mu.Unlock()
	s.pool.reserve(-s.nslots)
	if err := s.st.close(); err != nil {
		return fmt.Errorf("cow: close store of %q: %w", s.name, err)
	}
	return nil
}

// gaveUp reports whether abandon gave up on s.
func (s *Snapshot) gaveUp() bool {
	select {
	case <-s.givenUp:
		return true
	default:
		return false
	}
}

// Name is the snapshot's name.
func (s *Snapshot) Name() string { return s.name }

// Size is the snapshot's size: the origin's size.
func (s *Snapshot) Size() int64 { return s.geo.size }

// ReadAt reads the frozen image (the I/O half of fss_bs_thread): it reads
// the origin where clusters are not yet copied, then overlays the clusters
// that have been copied, from the cache or the store. A cluster copied
// before the read starts is not read from the origin at all: the bit never
// clears, so the overlay would replace those bytes anyway.
//
// Why this is race-free: a request modifies the origin within cluster c
// only after c's copy is VALID and c's copied bit is set (copyCluster), and
// the bits are checked below only after the origin read completed. If the
// bit is clear at the check, no modification of c had started when the
// origin read ended, so the bytes read are the frozen ones; if it is set,
// the frozen bytes are taken from the copy. A copy leaves the cache only
// after the store can find it (run), so a cache miss finds it in the store.
// If the snapshot became invalid, copy-on-write may have been skipped for
// it, so the check of invalid after the read turns the result into EIO.
func (s *Snapshot) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkRange(s.geo.size, off, int64(len(p))); err != nil {
		return err
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if err := s.readable(); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	end := off + int64(len(p))
	first, last := s.geo.span(off, int64(len(p)))
	// Read the origin in runs of clusters not copied now. The check below,
	// after these reads completed, is the one that makes the result right.
	run := int64(-1) // start of the pending run of uncopied clusters
	for c := first; ; c++ {
		copied := s.copied.get(c)
		if !copied && run < 0 {
			run = max(off, s.geo.off(c))
		}
		if run >= 0 && (copied || c == last) {
			runEnd := end
			if copied {
				runEnd = s.geo.off(c)
			}
			if err := readFull(s.e.origin, p[run-off:runEnd-off], run); err != nil {
				return fmt.Errorf("cow: snapshot %q: read origin at %d: %w", s.name, run, err)
			}
			run = -1
		}
		if c == last {
			break
		}
	}
	for c := first; ; c++ {
		if s.copied.get(c) {
			if err := s.overlay(c, p, off, end); err != nil {
				return err
			}
		}
		if c == last {
			break
		}
	}
	return s.readable()
}

// overlay copies the frozen bytes of cluster c that fall in [off, end)
// into p (which holds [off, end)).
func (s *Snapshot) overlay(c uint32, p []byte, off, end int64) error {
	cstart := s.geo.off(c)
	lo := max(off, cstart)
	hi := min(end, cstart+int64(s.geo.clusterLen(c)))
	dst := p[lo-off : hi-off]
	coff := int(lo - cstart)

	var buf *clusterBuf
	s.mu.Lock()
	if sl := s.cached[c]; sl != nil && (sl.state == slotValid || sl.state == slotCommitting) {
		buf = sl.buf
		buf.refs.Add(1)
	}
	s.mu.Unlock()
	if buf != nil {
		copy(dst, buf.data[coff:])
		buf.release()
		return nil
	}
	s.stats.mapReads.Add(1)
	ok, err := s.st.readCluster(c, dst, coff)
	if errors.Is(err, backstore.ErrChecksum) {
		// The store was damaged since the commit: the copy is lost, and
		// the snapshot with it. Say so for good rather than once per read.
		s.mu.Lock()
		s.failLocked(fmt.Sprintf("backing store damaged: %v", err))
		s.mu.Unlock()
	}
	if err != nil {
		if s.invalid.Load() {
			return s.readable()
		}
		return fmt.Errorf("cow: snapshot %q: read cluster %d from store: %w: %w", s.name, c, err, syscall.EIO)
	}
	if !ok {
		if err := s.readable(); err != nil {
			return err
		}
		return fmt.Errorf("cow: snapshot %q: cluster %d is copied but not in the store: %w", s.name, c, syscall.EIO)
	}
	return nil
}

func (s *Snapshot) readable() error {
	if s.closed.Load() {
		return ErrCleared
	}
	if s.bookmark.Load() {
		return ErrBookmark
	}
	if s.invalid.Load() {
		s.mu.Lock()
		reason := s.reason
		s.mu.Unlock()
		return &invalidError{reason: reason}
	}
	return nil
}

// Stats are per-snapshot counters (fss_stat).
type Stats struct {
	CowCalls       int64 // origin-modifying requests that consulted the snapshot
	ClustersCopied int64 // clusters copied from the origin into the cache
	CacheFullWaits int64 // times a request waited for a free cache slot (cowwait3)
	MapReads       int64 // snapshot reads that looked a cluster up in the store
	MapWrites      int64 // cluster records committed to the store
	BytesCopied    int64 // origin bytes copied
	Batches        int64 // commits
	Syncs          int64 // commits that synced the store (persistent mode)
	// CommitLatency is how long successful commits took, writes and sync
	// together.
	CommitLatency Histogram
}

// Histogram is a distribution of durations in fixed buckets.
type Histogram struct {
	// Bounds are the buckets' upper bounds, ascending; shared, read-only.
	Bounds []time.Duration
	// Counts[i] counts observations in (Bounds[i-1], Bounds[i]]; the last
	// element, beyond Bounds, those above the largest bound. Not cumulative.
	Counts []int64
	Sum    time.Duration // of all observations
}

// Info describes a snapshot.
type Info struct {
	Name           string
	UUID           string
	Created        time.Time
	ClusterSize    int
	ClustersTotal  int64
	ClustersCopied int64
	Persistent     bool
	Valid          bool
	Reason         string // why the snapshot is invalid
	Bookmark       bool   // its data was dropped (Engine.Bookmark)
	StoreBytes     int64
	CacheSlots     int
	CreatePause    time.Duration // how long Create held origin writes (0 after Reopen)
	Stats          Stats
}

// Info reports the snapshot's state and statistics.
func (s *Snapshot) Info() Info {
	s.mu.Lock()
	copied, reason := s.copiedN, s.reason
	s.mu.Unlock()
	// stop holds life while it closes the store, which a stalled disk can
	// make last: Info answers meanwhile, without the store's size, rather
	// than hold up whoever asks (the daemon's status).
	var bytes int64
	if s.life.TryRLock() {
		if !s.closed.Load() {
			bytes = s.st.bytes()
		}
		s.life.RUnlock()
	}
	return Info{
		Name:           s.name,
		UUID:           s.hdr.UUID,
		Created:        s.hdr.Created,
		ClusterSize:    s.geo.csize,
		ClustersTotal:  int64(s.geo.count),
		ClustersCopied: copied,
		Persistent:     s.persistent,
		Valid:          !s.invalid.Load(),
		Reason:         reason,
		Bookmark:       s.bookmark.Load(),
		StoreBytes:     bytes,
		CacheSlots:     s.nslots,
		CreatePause:    s.pause,
		Stats: Stats{
			CowCalls:       s.stats.cowCalls.Load(),
			ClustersCopied: s.stats.clustersCopied.Load(),
			CacheFullWaits: s.stats.cacheFullWaits.Load(),
			MapReads:       s.stats.mapReads.Load(),
			MapWrites:      s.stats.mapWrites.Load(),
			BytesCopied:    s.stats.bytesCopied.Load(),
			Batches:        s.stats.batches.Load(),
			Syncs:          s.stats.syncs.Load(),
			CommitLatency:  s.stats.commitLatency(),
		},
	}
}
