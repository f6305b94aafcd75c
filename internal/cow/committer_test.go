package cow

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// manualClock is a clock that moves only when the test advances it.
type manualClock struct {
	mu     sync.Mutex
	now    time.Duration
	timers []*manualTimer
}

type manualTimer struct {
	c     *manualClock
	at    time.Duration
	f     func()
	armed bool
}

func (c *manualClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{c: c, at: c.now + d, f: f, armed: true}
	c.timers = append(c.timers, t)
	return t
}

func (t *manualTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.armed
	t.armed = false
	return was
}

func (t *manualTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.armed
	t.at, t.armed = t.c.now+d, true
	return was
}

// advance moves the clock by d and runs the timers that came due.
func (c *manualClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now += d
	var due []func()
	for _, t := range c.timers {
		if t.armed && t.at <= c.now {
			t.armed = false
			due = append(due, t.f)
		}
	}
	c.mu.Unlock()
	for _, f := range due {
		f()
	}
}

// armed waits until a timer is armed and returns how far ahead it is due.
func (c *manualClock) armed(t *testing.T) time.Duration {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		c.mu.Lock()
		for _, tm := range c.timers {
			if tm.armed {
				d := tm.at - c.now
				c.mu.Unlock()
				return d
			}
		}
		c.mu.Unlock()
	}
	t.Fatal("no timer armed")
	return 0
}

// batchStore is a store whose commits report a fixed sync time, tell the
// test how many clusters each carries, and wait for the test to let each
// through.
type batchStore struct {
	*memStore
	sync  time.Duration
	calls chan storeCall // a commit sends itself as it begins
	done  chan struct{}  // closed at the end of the test: commits go through
}

// storeCall is one commit in the store, waiting for release to close.
type storeCall struct {
	n       int
	release chan struct{}
}

func (b *batchStore) commit(batch []storeCluster) (time.Duration, error) {
	call := storeCall{n: len(batch), release: make(chan struct{})}
	b.calls <- call
	select {
	case <-call.release:
	case <-b.done:
	}
	_, err := b.memStore.commit(batch)
	return b.sync, err
}

// newTestCommitter starts a persistent committer of nslots slots over st,
// alone: its dropped slots go nowhere. At the end of the test st lets every
// commit through, so that a failed test does not leave the writer stuck.
func newTestCommitter(t *testing.T, st *batchStore, clk clock, nslots int) *committer {
	t.Helper()
	q := &committer{persistent: true, st: st, inv: &invalidation{}, stats: &counters{}, clock: clk}
	q.init(nslots)
	q.drop = func([]*slot) {}
	q.fail = func(reason string) { t.Errorf("the committer failed: %s", reason) }
	q.record = func(string) {}
	q.start()
	t.Cleanup(func() {
		close(st.done)
		q.stop(false)
		q.waitStopped()
	})
	return q
}

func newBatchStore(csize int) *batchStore {
	return &batchStore{
		memStore: newMemStore(storeOptions{Name: "t", ClusterSize: csize, Persistent: true}),
		sync:     time.Millisecond,
		calls:    make(chan storeCall, 64),
		done:     make(chan struct{}),
	}
}

// publish queues a VALID slot for cluster c, as cache.publish does.
func publishSlot(q *committer, c uint32, csize int) uint64 {
	return q.enqueue(&slot{cluster: c, state: slotValid, buf: &clusterBuf{data: make([]byte, csize)}})
}

// wantBatch waits for a commit of n clusters to reach the store and
// returns it, waiting for release.
func wantBatch(t *testing.T, st *batchStore, n int) storeCall {
	t.Helper()
	select {
	case call := <-st.calls:
		if call.n != n {
			t.Fatalf("commit of %d clusters, want %d", call.n, n)
		}
		return call
	case <-time.After(5 * time.Second):
		t.Fatalf("no commit; want one of %d clusters", n)
	}
	return storeCall{}
}

// noBatch checks that no commit begins for a while: what is tested waits on
// the manual clock or on a condition, so a commit now would be a bug.
func noBatch(t *testing.T, st *batchStore, when string) {
	t.Helper()
	select {
	case call := <-st.calls:
		t.Fatalf("commit of %d clusters %s", call.n, when)
	case <-time.After(20 * time.Millisecond):
	}
}

// TestCommitterLinger: after a commit with an expensive sync that released
// several requests, the next commit waits for as many clusters as it
// expects, for at most lingerFor's time on the committer's clock.
func TestCommitterLinger(t *testing.T) {
	const csize = 4096
	for _, tc := range []struct {
		name  string
		more  bool // a third cluster arrives while the commit lingers
		batch int
	}{
		{"clusters arrive", true, 3},
		{"time runs out", false, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &manualClock{}
			st := newBatchStore(csize)
			q := newTestCommitter(t, st, clk, 8)

			// Commit 1 (one cluster; no sync time known, so no
			// linger) is held in the store while two more clusters
			// are published: it expects 3 next, after a 1 ms sync.
			first := async(func() error { q.waitDurable(publishSlot(q, 0, csize)); return nil })
			call := wantBatch(t, st, 1)
			publishSlot(q, 1, csize)
			seq := publishSlot(q, 2, csize)
			close(call.release)
			await(t, first, "the first write")

			// Commit 2 lingers for a third cluster.
			second := async(func() error { q.waitDurable(seq); return nil })
			if d, want := clk.armed(t), lingerFor(time.Millisecond, 2, 3); d != want {
				t.Fatalf("linger of %v, want %v", d, want)
			}
			noBatch(t, st, "while lingering")
			if tc.more {
				publishSlot(q, 3, csize)
			} else {
				clk.advance(maxLinger)
			}
			close(wantBatch(t, st, tc.batch).release)
			await(t, second, "the second write")
		})
	}
}

// TestCommitterLazy: a held write's commit is due after holdDelay on the
// committer's clock, when hurried, or when half the cache waits for one;
// not before.
func TestCommitterLazy(t *testing.T) {
	const csize, nslots = 4096, 8
	for _, tc := range []struct {
		name  string
		due   func(t *testing.T, q *committer, st *batchStore, clk *manualClock) // makes the commit due
		batch int
	}{
		{"delay", func(t *testing.T, _ *committer, st *batchStore, clk *manualClock) {
			clk.advance(holdDelay - time.Microsecond)
			noBatch(t, st, "before the delay ran out")
			clk.advance(time.Microsecond)
		}, 1},
		{"hurry", func(_ *testing.T, q *committer, _ *batchStore, _ *manualClock) { q.hurry(1) }, 1},
		{"half the cache", func(_ *testing.T, q *committer, _ *batchStore, _ *manualClock) {
			var seq uint64
			for c := uint32(1); c < nslots/2; c++ {
				seq = publishSlot(q, c, csize)
			}
			go q.waitLazy(seq) // the held write that fills half the cache commits
		}, nslots / 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &manualClock{}
			st := newBatchStore(csize)
			q := newTestCommitter(t, st, clk, nslots)
			held := async(func() error { q.waitLazy(publishSlot(q, 0, csize)); return nil })
			if d := clk.armed(t); d != holdDelay {
				t.Fatalf("held write waits %v, want %v", d, holdDelay)
			}
			noBatch(t, st, "before it was due")
			tc.due(t, q, st, clk)
			close(wantBatch(t, st, tc.batch).release)
			await(t, held, "the held write's wait")
		})
	}
}

// TestCommitterOverlap: a held write's commit that comes due while another
// commit is in the store starts at once, so that its data writes overlap
// the other's sync; and publications become durable in order: the second
// commit returning first makes nothing durable.
func TestCommitterOverlap(t *testing.T) {
	const csize, nslots = 4096, 8
	st := newBatchStore(csize)
	q := newTestCommitter(t, st, &manualClock{}, nslots)
	first := async(func() error { q.waitDurable(publishSlot(q, 0, csize)); return nil })
	a := wantBatch(t, st, 1)
	var seq uint64
	for c := uint32(1); c <= nslots/2; c++ {
		seq = publishSlot(q, c, csize)
	}
	held := async(func() error { q.waitLazy(seq); return nil }) // due: half the cache waits
	b := wantBatch(t, st, nslots/2)
	third := publishSlot(q, nslots, csize)
	async(func() error { q.waitLazy(third); return nil })
	q.hurry(third)
	noBatch(t, st, "while two are in flight")
	close(b.release)
	pending(t, first, "the first commit's write")
	pending(t, held, "the second commit's held write (with the first commit in the store)")
	if d := q.durableSeq.Load(); d != 0 {
		t.Fatalf("durable up to %d with the first commit still in the store", d)
	}
	close(a.release)
	await(t, first, "the first write")
	await(t, held, "the held write's wait")
	if d := q.durableSeq.Load(); d < seq {
		t.Fatalf("durable up to %d after both commits returned, want %d", d, seq)
	}
}

// TestCommitterWakeLazy: a change wakes the held writes it concerns: those whose publication is durable, one more to lead a commit that
// may start, every one once the snapshot is released or stopping; the
// others stay registered, unsignalled.
func TestCommitterWakeLazy(t *testing.T) {
	seqs := []uint64{3, 5, 6, 9}
	for _, tc := range []struct {
		name  string
		setup func(q *committer)
		woken []uint64
	}{
		{"durable", func(q *committer) {}, []uint64{3, 5}},
		{"durable and a lead", func(q *committer) { q.hurried = true }, []uint64{3, 5, 6}},
		{"no lead with the store busy", func(q *committer) {
			q.hurried = true
			q.inflight = make([]*commitRun, maxInflight)
		}, []uint64{3, 5}},
		{"no lead with nothing pending", func(q *committer) {
			q.hurried = true
			q.pending = q.pending[:0]
		}, []uint64{3, 5}},
		{"released", func(q *committer) { q.inv.released.Store(true) }, seqs},
		{"stopping", func(q *committer) { q.stopping.Store(true) }, seqs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := &committer{inv: &invalidation{}}
			q.init(8)
			q.durableSeq.Store(5)
			q.pending = append(q.pending, &slot{seq: 10})
			var ws []*lazyWaiter
			for _, seq := range seqs {
				w := &lazyWaiter{seq: seq, wake: make(chan struct{}, 1)}
				ws = append(ws, w)
				q.lazy = append(q.lazy, w)
			}
			tc.setup(q)
			q.mu.Lock()
			q.wakeLazyLocked()
			q.mu.Unlock()
			var woken, kept []uint64
			for _, w := range ws {
				if len(w.wake) == 1 {
					woken = append(woken, w.seq)
				}
			}
			for _, w := range q.lazy {
				if len(w.wake) != 0 {
					t.Errorf("waiter %d signalled and still registered", w.seq)
				}
				kept = append(kept, w.seq)
			}
			if fmt.Sprint(woken) != fmt.Sprint(tc.woken) {
				t.Errorf("woken %v, want %v", woken, tc.woken)
			}
			if len(woken)+len(kept) != len(seqs) {
				t.Errorf("woken %v and registered %v: want each of %v in one of them", woken, kept, seqs)
			}
		})
	}
}
