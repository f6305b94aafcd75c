package cow

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// clock is the time source of the commit policy (lingerFor, holdDelay), so
// that tests can drive it.
type clock interface {
	AfterFunc(d time.Duration, f func()) timer
}

// timer is the part of *time.Timer the committer uses.
type timer interface {
	Stop() bool
	Reset(d time.Duration) bool
}

type realClock struct{}

func (realClock) AfterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

// committer drains a snapshot's VALID cache slots to its store (fss_bs_thread)
// and tells requests when their clusters are durable.
//
// Publication numbers: enqueue numbers VALID slots 1, 2, ... in queue order
// (validSeq is the last); durableSeq is the highest known durable (below).
// Every commit takes the whole queue, so the queue and the numbers agree.
//
// Store writes: a commit runs on the writer goroutine (run) or, in
// persistent mode, on a request waiting for it (waitDurable), which saves
// two goroutine hand-offs per first write. Commits are in inflight, in the
// order they took their batches, from before their store call until every
// commit before them returned too; mu is released during the store call.
// Two may be in flight only when the second is a held writes' lazy commit
// (waitLazy): its data writes then overlap the first's sync, and the store
// orders them (backstore.Store.Commit). Other store writes (the
// invalidation's record, what holdStore's caller does) run alone, with
// exclusive set, and no commit starts meanwhile.
//
// durableSeq advances to the top of a commit only once it and every commit
// before it returned nil, and never once the snapshot is invalid: then the
// requests wait for the release instead.
//
// Failure: a commit that fails makes the snapshot invalid (fail) before it
// drops its slots, so a request that then finds the cluster copied and out
// of the cache already sees the snapshot invalid and waits for its release,
// not for a commit that will never come.
type committer struct {
	// Set at construction.
	persistent bool
	nslots     int
	st         clusterStore
	inv        *invalidation
	stats      *counters
	clock      clock
	drop       func([]*slot)       // cache.drop: frees slots whose commit returned
	fail       func(reason string) // Snapshot.fail, called without mu
	record     func(reason string) // Snapshot.recordInvalid, called without mu

	validSeq, durableSeq atomic.Uint64 // written under mu, read without it by settled
	// syncCost is the commits' sync time in nanoseconds, averaged (see
	// commitLocked), read without mu by Engine.hold.
	syncCost atomic.Int64
	stopping atomic.Bool // written under mu

	mu sync.Mutex
	// durCond: durableSeq advanced, a commit ended, or the snapshot failed
	// or was released. Held writes do not wait on it (see lazy); it is
	// broadcast only by wakeAllLocked, which wakes them too.
	durCond  sync.Cond
	workCond sync.Cond // the writer has work: pending (transient), stop, a record due
	pending  []*slot   // VALID slots in publication order
	// full: a request found no free slot (cache.reserve) since the last
	// commit took its batch. It may be stale once that commit freed its
	// slots, which only makes the next commit come early.
	full      bool
	discard   bool         // stopping without committing what is cached (Clear)
	inflight  []*commitRun // see Store writes above
	exclusive bool
	spare     []*commitRun // finished runs, for reuse
	// givenUp is closed by abandon, under mu: the engine stopped waiting
	// for this snapshot's store, so stop no longer waits for the writer or
	// a commit in progress, either of which may be inside a store call
	// that never returns.
	givenUp chan struct{}
	done    chan struct{} // closed when run returns

	// Group commit (see linger): the last commit's sync time, the
	// clusters the next batch may gather, and the wait for them.
	lastSync    time.Duration
	expect      int
	lingering   bool
	lingerUp    bool
	lingerCond  sync.Cond
	lingerTimer timer
	// Lazy commits (waitLazy): held writes waiting, a commit asked for now
	// (hurry), the held writes' delay expired, and its timer.
	lazy      []*lazyWaiter
	hurried   bool
	lazyDue   bool
	lazyArmed bool
	lazyTimer timer
}

func (q *committer) init(nslots int) {
	q.nslots = nslots
	q.pending = make([]*slot, 0, nslots)
	q.givenUp = make(chan struct{})
	q.done = make(chan struct{})
	q.durCond.L = &q.mu
	q.workCond.L = &q.mu
	q.lingerCond.L = &q.mu
}

// enqueue numbers the VALID slot sl and queues it for a commit. The cache
// calls it with its mu held (publication).
func (q *committer) enqueue(sl *slot) uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	seq := q.validSeq.Load() + 1
	q.validSeq.Store(seq)
	sl.seq = seq
	q.pending = append(q.pending, sl)
	if !q.persistent {
		// A persistent snapshot's clusters are committed by the request
		// that waits for them, or found in a commit in progress
		// (waitDurable): no writer wake-up.
		q.workCond.Signal()
	}
	if q.lingering {
		q.lingerCond.Signal()
	}
	return seq
}

// cacheFull is told by the cache that a request waits for a free slot.
func (q *committer) cacheFull() {
	q.mu.Lock()
	q.full = true
	q.workCond.Signal()
	q.lingerCond.Signal()
	q.mu.Unlock()
}

// wake wakes every waiter after the snapshot failed, was released or
// began stopping.
func (q *committer) wake() {
	q.mu.Lock()
	q.wakeAllLocked()
	q.workCond.Signal()
	q.lingerCond.Signal()
	q.mu.Unlock()
}

// waitDurable blocks until publication seq is committed, the snapshot
// failed and was released, or it is stopping; seq math.MaxUint64 waits
// for the release of an invalid snapshot.
func (q *committer) waitDurable(seq uint64) {
	if q.durableSeq.Load() >= seq || q.inv.released.Load() {
		return
	}
	q.mu.Lock()
	led := false
	for q.durableSeq.Load() < seq && !q.inv.released.Load() && !q.stopping.Load() {
		if q.persistent && !q.busyLocked() && !q.inv.recordDue.Load() && len(q.pending) > 0 {
			// Lead: commit what is pending (ours included) here
			// rather than wake the writer and wait to be woken.
			q.commitLocked(true)
			led = true
			continue
		}
		q.durCond.Wait()
	}
	handOver := led && len(q.pending) > 0
	q.mu.Unlock()
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
func (q *committer) waitLazy(seq uint64) {
	if q.durableSeq.Load() >= seq || q.inv.released.Load() {
		return
	}
	q.mu.Lock()
	var w *lazyWaiter
	for q.durableSeq.Load() < seq && !q.inv.released.Load() && !q.stopping.Load() {
		if q.mayLeadLazyLocked() {
			q.commitLocked(false)
			continue
		}
		if !q.lazyArmed {
			q.lazyArmed = true
			if q.lazyTimer == nil {
				q.lazyTimer = q.clock.AfterFunc(holdDelay, q.lazyExpired)
			} else {
				q.lazyTimer.Reset(holdDelay)
			}
		}
		if w == nil {
			w = &lazyWaiter{seq: seq, wake: make(chan struct{}, 1)}
		}
		q.lazy = append(q.lazy, w)
		q.mu.Unlock()
		<-w.wake
		q.mu.Lock()
	}
	q.mu.Unlock()
}

// lazyWaiter is a held write waiting in waitLazy for publication seq.
//
// Held writes wait on a channel each rather than on durCond: thousands may
// wait at once (the budget allows one per heldWriteCost and payload), and a
// broadcast at the end of every commit woke them all, most only to find
// their own commit not durable yet and wait again. wakeLazyLocked wakes
// only those a change concerns.
type lazyWaiter struct {
	seq  uint64
	wake chan struct{} // capacity 1: signalled once per registration
}

// wakeAllLocked tells every waiter for a commit that something changed
// (durableSeq advanced, a commit ended or became due, the snapshot failed,
// was released or is stopping): the requests waiting on durCond, and the
// held writes wakeLazyLocked finds concerned. It is called with mu held.
func (q *committer) wakeAllLocked() {
	q.durCond.Broadcast()
	q.wakeLazyLocked()
}

// wakeLazyLocked wakes, each once, the held writes whose wait may be over:
// all of them when the snapshot was released or is stopping, otherwise
// those whose publication is durable, and one more to lead a lazy commit
// if one may start now. A woken waiter is off the list until it waits
// again, so each registration gets one signal and a buffered channel never
// blocks the waker.
func (q *committer) wakeLazyLocked() {
	if len(q.lazy) == 0 {
		return
	}
	all := q.inv.released.Load() || q.stopping.Load()
	durable := q.durableSeq.Load()
	lead := q.mayLeadLazyLocked()
	keep := q.lazy[:0]
	for _, w := range q.lazy {
		switch {
		case all || w.seq <= durable:
		case lead:
			lead = false
		default:
			keep = append(keep, w)
			continue
		}
		w.wake <- struct{}{}
	}
	clear(q.lazy[len(keep):])
	q.lazy = keep
}

// mayLeadLazyLocked reports whether a held write may start a lazy commit
// now: one is due, clusters wait for it, and the store takes another.
func (q *committer) mayLeadLazyLocked() bool {
	return !q.exclusive && !q.lingering && len(q.inflight) < maxInflight && !q.inv.recordDue.Load() &&
		len(q.pending) > 0 && q.lazyDueLocked()
}

func (q *committer) lazyExpired() {
	q.mu.Lock()
	q.lazyArmed = false
	q.lazyDue = true
	q.wakeAllLocked()
	q.mu.Unlock()
}

// lazyDueLocked reports whether the held writes' commit is due.
func (q *committer) lazyDueLocked() bool {
	return q.hurried || q.lazyDue || q.full || len(q.pending) >= q.nslots/2
}

// hurry asks for a commit of publication seq now, for a held write that a
// read, a flush or a change of the snapshot set waits for.
func (q *committer) hurry(seq uint64) {
	if q.durableSeq.Load() >= seq || q.inv.released.Load() {
		return
	}
	q.mu.Lock()
	if q.durableSeq.Load() < seq {
		q.hurried = true
		q.wakeAllLocked()
	}
	q.mu.Unlock()
}

func (q *committer) start() { go q.run() }

// run is the writer goroutine (fss_bs_thread): it commits pending clusters,
// all of them in one commit (one sync in persistent mode), records an
// invalidation before releasing the snapshot, and on stop commits (or, for
// Clear, drops) what is left.
func (q *committer) run() {
	defer close(q.done)
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		switch {
		case q.busyLocked():
			// A request is committing; it signals when done.
		case q.inv.recordDue.Load():
			reason, _ := q.inv.takeRecord()
			q.exclusive = true
			q.mu.Unlock()
			q.record(reason)
			q.inv.release()
			q.mu.Lock()
			q.exclusive = false
			q.wakeAllLocked()
			continue
		case len(q.pending) > 0 && (len(q.lazy) == 0 || q.stopping.Load() || q.lazyDueLocked()):
			// Pending clusters that only held writes wait for are
			// committed when due (waitLazy); those of waiting requests
			// now.
			q.commitLocked(true)
			continue
		case q.stopping.Load():
			return
		}
		q.workCond.Wait()
	}
}

// maxInflight is how many commits may be in flight: one syncing, the next
// writing its data.
const maxInflight = 2

// commitRun is one commit in flight.
type commitRun struct {
	batch    []*slot
	clusters []storeCluster
	top      uint64 // the batch's highest publication number
	returned bool   // its store call returned (or its batch was dropped)
	ok       bool   // the store call returned nil
}

// busyLocked reports whether a store write runs or is about to (a commit
// lingering for its batch).
func (q *committer) busyLocked() bool { return q.exclusive || q.lingering || len(q.inflight) > 0 }

// commitLocked commits every pending cluster as one batch. It is called
// with mu held, by the writer or a request (waitDurable) when the store is
// not busy, or by a held write (waitLazy) when fewer than maxInflight
// commits are in flight, and releases mu during the store I/O.
func (q *committer) commitLocked(linger bool) {
	defer func() {
		q.wakeAllLocked()
		if len(q.pending) > 0 || q.stopping.Load() || q.inv.recordDue.Load() {
			// The writer may be waiting for this commit to end (run);
			// it has nothing to do otherwise, and waking it after every
			// commit a request led costs a futex wake-up per first write.
			q.workCond.Signal()
		}
	}()
	if q.persistent && linger && len(q.inflight) == 0 {
		q.linger() // busy meanwhile (lingering): no other commit starts
	}
	q.hurried, q.lazyDue, q.full = false, false, false
	if len(q.pending) == 0 {
		return
	}
	var run *commitRun
	if n := len(q.spare); n > 0 {
		run, q.spare = q.spare[n-1], q.spare[:n-1]
	} else {
		run = &commitRun{batch: make([]*slot, 0, q.nslots), clusters: make([]storeCluster, 0, q.nslots)}
	}
	run.batch = append(run.batch[:0], q.pending...)
	run.top, run.returned, run.ok = run.batch[len(run.batch)-1].seq, false, false
	clear(q.pending)
	q.pending = q.pending[:0]
	q.inflight = append(q.inflight, run)
	drop := q.inv.invalid.Load() || q.discard
	q.mu.Unlock()

	var (
		syncTime time.Duration
		err      error
	)
	if !drop {
		for _, sl := range run.batch {
			run.clusters = append(run.clusters, storeCluster{index: sl.cluster, data: sl.buf.data})
		}
		start := time.Now()
		syncTime, err = q.st.commit(run.clusters)
		took := time.Since(start)
		clear(run.clusters)
		run.clusters = run.clusters[:0]
		if err != nil {
			// Before the drop: see Failure above.
			q.fail(fmt.Sprintf("write backing store: %v", err))
		} else {
			q.stats.batches.Add(1)
			q.stats.observeCommit(took)
			if q.persistent {
				q.stats.syncs.Add(1)
			}
			q.stats.mapWrites.Add(int64(len(run.batch)))
		}
	}
	n := len(run.batch)
	q.drop(run.batch)
	run.batch = run.batch[:0]

	q.mu.Lock()
	run.returned, run.ok = true, !drop && err == nil
	// Advance over the commits that returned, in order (see above).
	for len(q.inflight) > 0 && q.inflight[0].returned {
		r := q.inflight[0]
		if r.ok && !q.inv.invalid.Load() {
			q.durableSeq.Store(max(q.durableSeq.Load(), r.top))
		}
		q.inflight = append(q.inflight[:0], q.inflight[1:]...)
		q.spare = append(q.spare, r)
	}
	if drop {
		return
	}
	// The requests this commit releases will likely come back with their
	// next clusters, while those that arrived during it wait (see linger).
	q.expect, q.lastSync = n+len(q.pending), syncTime
	// A moving average (weight 1/8 for the new sample), so that one slow
	// sync of a fast store does not make writes held, nor one fast sync of
	// a slow store stop it.
	if c := q.syncCost.Load(); c == 0 {
		q.syncCost.Store(int64(syncTime))
	} else {
		q.syncCost.Store(c + (int64(syncTime)-c)/8)
	}
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
// batch to reach q.expect clusters; see lingerFor. It stops early when the
// cache is full: nobody can add a cluster before this commit frees slots.
func (q *committer) linger() {
	d := lingerFor(q.lastSync, len(q.pending), q.expect)
	if d == 0 {
		return
	}
	q.lingerUp = false
	q.lingering = true
	if q.lingerTimer == nil {
		q.lingerTimer = q.clock.AfterFunc(d, q.lingerExpired)
	} else {
		q.lingerTimer.Reset(d)
	}
	for len(q.pending) < q.expect && !q.full && !q.lingerUp && !q.stopping.Load() && !q.inv.invalid.Load() {
		q.lingerCond.Wait()
	}
	q.lingering = false
	q.lingerTimer.Stop()
}

func (q *committer) lingerExpired() {
	q.mu.Lock()
	q.lingerUp = true
	q.lingerCond.Signal()
	q.mu.Unlock()
}

// heldUpLocked reports whether the store has not caught up with the origin
// requests: a store write is in progress, clusters wait for a commit, or
// an invalidation waits to be recorded or released. While that is so,
// origin requests may be waiting for the snapshot (a commit, cache space,
// the release). A transient snapshot's pending clusters count too: they
// hold cache slots that requests may be waiting for.
func (q *committer) heldUpLocked() bool {
	return !q.inv.released.Load() && (q.busyLocked() || len(q.pending) > 0 || q.inv.invalid.Load())
}

// holdStore waits for the store write in progress and keeps any other from
// starting until releaseStore, so that the caller may use the store (it is
// called with the engine's gate held exclusively: no request publishes
// meanwhile). It returns the number of clusters waiting for a commit.
func (q *committer) holdStore() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.busyLocked() {
		q.durCond.Wait()
	}
	q.exclusive = true
	return len(q.pending)
}

func (q *committer) releaseStore() {
	q.mu.Lock()
	q.exclusive = false
	q.wakeAllLocked()
	q.workCond.Signal()
	q.mu.Unlock()
}

// idle reports that no store write is in progress and no cluster waits for
// a commit.
func (q *committer) idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return !q.busyLocked() && len(q.pending) == 0
}

// stop asks the writer to commit what is pending (or to drop it, when
// discard) and return; requests stop waiting for commits.
func (q *committer) stop(discard bool) {
	q.mu.Lock()
	q.discard = discard
	q.stopping.Store(true)
	q.wakeAllLocked()
	q.workCond.Signal()
	q.lingerCond.Signal()
	q.mu.Unlock()
}

// waitStopped waits for what stop asked, unless abandon gave up on the
// store.
func (q *committer) waitStopped() {
	select {
	case <-q.done:
	case <-q.givenUp:
	}
	q.mu.Lock()
	for q.busyLocked() && !q.gaveUp() { // a request's commit that began before stopping
		q.durCond.Wait()
	}
	q.mu.Unlock()
}

// giveUpLocked records that the engine gave up waiting for the store.
func (q *committer) giveUpLocked() {
	if !q.gaveUp() {
		close(q.givenUp)
	}
	q.wakeAllLocked() // waitStopped may be waiting for a commit in progress
}

// gaveUp reports whether abandon gave up on the store.
func (q *committer) gaveUp() bool {
	select {
	case <-q.givenUp:
		return true
	default:
		return false
	}
}

// release drops the committer's memory once it stopped.
func (q *committer) release() {
	q.mu.Lock()
	q.pending, q.spare = nil, nil
	q.mu.Unlock()
}
