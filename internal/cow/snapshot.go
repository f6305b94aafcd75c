package cow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
)

// Snapshot is one frozen image of the origin. Its state is in three parts,
// each with its own lock and invariants: the cache (cache.go: slots and the
// copied bitmap), the committer (committer.go: commits, the writer
// goroutine, the commit policy) and the invalidation (invalidation.go).
// Lock order: cache, then committer, then invalidation; Snapshot itself
// holds no lock but life.
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

	cache   cache
	commits committer
	inv     invalidation

	closed atomic.Bool // reads refused: the snapshot was cleared or the engine closed
	// bookmark: the store dropped its data (Engine.Bookmark); the snapshot
	// only records which clusters the origin wrote, and reads are refused.
	// Set with the engine's gate held exclusively, never cleared.
	bookmark atomic.Bool

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
		log:        e.log.With("snapshot", name),
	}
	s.cache.init(nslots, geo.count)
	s.cache.refused = func() bool { return s.inv.invalid.Load() || s.commits.stopping.Load() }
	s.cache.full = func() {
		s.stats.cacheFullWaits.Add(1)
		s.commits.cacheFull()
	}
	s.cache.enqueue = s.commits.enqueue
	s.commits.init(nslots)
	s.commits.persistent = persistent
	s.commits.st = st
	s.commits.inv = &s.inv
	s.commits.stats = &s.stats
	s.commits.clock = e.clock
	s.commits.drop = s.cache.drop
	s.commits.fail = s.fail
	s.commits.record = s.recordInvalid
	s.pool.reserve(nslots)
	return s
}

// settled reports, without locking, that a request has nothing to do for
// cluster c in s: s failed and was released, or c is copied and (transient, or everything
// published is committed). The copied bit is loaded before the sequence
// numbers: c's sequence number is at most validSeq at that point, and
// durableSeq never decreases.
func (s *Snapshot) settled(c uint32) bool {
	if s.inv.released.Load() {
		return true
	}
	if s.inv.invalid.Load() || !s.cache.copied.get(c) {
		return false
	}
	return !s.persistent || s.commits.durableSeq.Load() >= s.commits.validSeq.Load()
}

// fail is fss_error: the snapshot becomes invalid with a reason. The
// committer drops what it holds and records the reason (recordInvalid);
// then waiters are released (origin requests go on without it). A
// transient snapshot is released at once. It is called with no lock of s
// held.
func (s *Snapshot) fail(reason string) {
	if s.invalidate(reason) {
		s.wake()
	}
}

// invalidate is the state change of fail, without the wake-up; it may run
// under the cache's or the committer's lock.
func (s *Snapshot) invalidate(reason string) bool {
	if !s.inv.fail(reason, !s.persistent) {
		return false
	}
	s.log.Error("snapshot invalid", "reason", reason)
	return true
}

// wake wakes the requests and the writer waiting on s, after it failed,
// was released or began stopping.
func (s *Snapshot) wake() {
	s.cache.wake()
	s.commits.wake()
}

func (s *Snapshot) start() { s.commits.start() }

// recordInvalid records the invalidation of s, as a store write of the
// committer: in the store's header and, for a persistent snapshot, in its
// owner's record (EngineOptions.RecordInvalid). The committer releases s
// only after it returned.
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

// abandon is Engine.Abandon for one snapshot: if its store has not caught
// up, s turns invalid for reason and, once that is recorded, its waiting
// requests are released. It reports whether it invalidated s; an error
// means s is held up and could not be released.
//
// abandon never touches the store: the writer, or a request leading a
// commit, may be inside a store call that never returns, and store writes
// are the committer's alone. So a persistent snapshot's invalidation is
// recorded by the owner's record alone (EngineOptions.RecordInvalid), on
// the caller's goroutine, and s is released only if that succeeded: the
// invariant of recordInvalid holds. When it fails, unlike a failure while
// the daemon runs, s is not released anyway: the requests waiting for it
// have not touched the origin, the owner is stopping and cuts their
// connections, and the store, which nobody wrote behind its back, still
// holds a right snapshot. (If the writer is free, it records the
// invalidation as for any failure, the store header included, and releases
// s itself.)
func (s *Snapshot) abandon(reason string) (bool, error) {
	q := &s.commits
	q.mu.Lock()
	if !q.heldUpLocked() {
		q.mu.Unlock()
		return false, nil
	}
	s.invalidate(reason) // keeps the first reason if s already failed
	reason = s.inv.why()
	q.giveUpLocked()
	q.mu.Unlock()
	s.wake()
	if !s.persistent {
		return true, nil // invalidate released it: nothing to record
	}
	if s.e.recordInvalid == nil {
		return false, fmt.Errorf("cow: snapshot %q: its store has not caught up and there is no owner's record to invalidate it in: the origin requests waiting for it wait for the store", s.name)
	}
	if err := s.e.recordInvalid(s.name, reason); err != nil {
		return false, fmt.Errorf("cow: snapshot %q: its store has not caught up and its invalidation cannot be recorded (%w): the origin requests waiting for it wait for the store", s.name, err)
	}
	s.inv.release()
	s.commits.wake()
	return true, nil
}

// stop ends copy-on-write for s (the caller already removed it from the
// engine's set), stops the writer after it committed what it holds (or
// dropped it, when discard), waits for reads in flight and closes the
// store. For a snapshot the engine gave up on (abandon) it waits for
// nothing and leaves the store open: see the comment below.
func (s *Snapshot) stop(discard bool) error {
	if discard {
		// Reads fail as cleared from here on: the writer is about to
		// drop cached copies without committing them, and a read that
		// then missed the cache would find nothing in the store and
		// report a copied cluster as missing.
		s.closed.Store(true)
	}
	s.commits.stop(discard)
	s.cache.wake()
	s.commits.waitStopped()
	s.closed.Store(true)
	if s.commits.gaveUp() {
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
	s.cache.release()
	s.commits.release()
	s.pool.reserve(-s.cache.nslots)
	if err := s.st.close(); err != nil {
		return fmt.Errorf("cow: close store of %q: %w", s.name, err)
	}
	return nil
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
// only after c's copy is VALID and c's copied bit is set (cache.publish),
// and the bits are checked below only after the origin read completed. If
// the bit is clear at the check, no modification of c had started when the
// origin read ended, so the bytes read are the frozen ones; if it is set,
// the frozen bytes are taken from the copy. A copy leaves the cache only
// after the store can find it (see cache), so a cache miss finds it
// in the store.
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
		copied := s.cache.copied.get(c)
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
		if s.cache.copied.get(c) {
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

	if buf := s.cache.lookup(c); buf != nil {
		copy(dst, buf.data[coff:])
		buf.release()
		return nil
	}
	s.stats.mapReads.Add(1)
	ok, err := s.st.readCluster(c, dst, coff)
	if errors.Is(err, backstore.ErrChecksum) {
		// The store was damaged since the commit: the copy is lost, and
		// the snapshot with it. Say so for good rather than once per read.
		s.fail(fmt.Sprintf("backing store damaged: %v", err))
	}
	if err != nil {
		if s.inv.invalid.Load() {
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
	if s.inv.invalid.Load() {
		return &invalidError{reason: s.inv.why()}
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
	copied, reason := s.cache.copiedCount(), s.inv.why()
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
		Valid:          !s.inv.invalid.Load(),
		Reason:         reason,
		Bookmark:       s.bookmark.Load(),
		StoreBytes:     bytes,
		CacheSlots:     s.cache.nslots,
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
