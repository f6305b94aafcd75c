package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

const rbModelOriginID = "rbmodel"

// rbModelSnap is a snapshot of the rollback model: its reference image
// and its current handle (a restart replaces it).
type rbModelSnap struct {
	name       string
	csize      int
	persistent bool
	frozen     []byte
	s          *Snapshot // guarded by the run's epoch lock
}

// rbModelStats summarises rollback model runs.
type rbModelStats struct {
	runs, rated, restarted, cleared int
	// racing counts the requests issued while the rollback was under
	// way; writesRestoring the writes among them to ranges with clusters
	// still to restore (the copier had not reached them yet).
	racing, writesRestoring int64
	samples                 int
}

func (s *rbModelStats) add(o rbModelStats) {
	s.runs += o.runs
	s.rated += o.rated
	s.restarted += o.restarted
	s.cleared += o.cleared
	s.racing += o.racing
	s.writesRestoring += o.writesRestoring
	s.samples += o.samples
}

// TestRollbackModel runs randomized rollbacks against a model: a reference
// copy of the origin and of every snapshot. Snapshots of several cluster
// sizes (one of them maybe transient) are taken with writes between them;
// the origin is rolled back to one of them, its copier sometimes
// rate-bounded so that it races the requests; meanwhile concurrent
// writers issue writes, trims and write-zeroes (FUA or not) on ranges no
// other request is using, FLUSHes, and reads of the origin and of every
// snapshot, checked against the references; other snapshots are cleared,
// and sometimes the engine is closed and reopened mid-way and the rollback
// resumed. RollbackInfo is sampled throughout: its remaining bytes never
// grow. At the end the origin file equals the reference, every snapshot
// left (the rollback's included) its image. -seed replays one run.
func TestRollbackModel(t *testing.T) {
	n, ops := 8, 100
	if testing.Short() {
		n, ops = 4, 60
	}
	var total rbModelStats
	for _, seed := range seeds(n, 0x70bac) {
		total.add(runRollbackModel(t, seed, ops))
		if t.Failed() {
			return
		}
	}
	t.Logf("%d runs: %d rate-bounded, %d restarted mid-way, %d snapshots cleared during the rollback; %d requests issued during it, %d writes to clusters still to restore; %d RollbackInfo samples",
		total.runs, total.rated, total.restarted, total.cleared, total.racing, total.writesRestoring, total.samples)
	if *seedFlag == 0 && (total.rated == 0 || total.restarted == 0 || total.cleared == 0 || total.writesRestoring == 0) {
		t.Errorf("the runs miss a case: %+v", total)
	}
}

// runRollbackModel runs one seeded rollback model; see TestRollbackModel.
func runRollbackModel(t *testing.T, seed uint64, ops int) (stats rbModelStats) {
	t.Helper()
	stats.runs = 1
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.keep(t, seed)
		}
	}()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0x7b))
	const size = 320<<10 + 1234 // every cluster size has a partial last cluster
	fs := vfstest.NewMemFS()
	origin := mustOpen(t, fs, "origin")
	model := make([]byte, size)
	fillRandom(rng, model)
	if _, err := origin.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := origin.Sync(); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }() // a second Close does nothing

	randRange := func(r *rand.Rand) (int64, int64) {
		n := 1 + r.Int64N(48<<10)
		switch r.IntN(10) {
		case 0, 1, 2:
			n = 1 + r.Int64N(600) // small, unaligned
		case 3:
			n = 1 + r.Int64N(128<<10)
		}
		n = min(n, size)
		return r.Int64N(size - n + 1), n
	}
	// During the rollback, writes are smaller and go to a third of the
	// origin, so that the copier has the rest to restore (at its rate,
	// under reads) and races the writes in that third.
	hotLen := int64(size / 3)
	hotOff := rng.Int64N(size - hotLen + 1)
	writeRange := func(r *rand.Rand) (int64, int64) {
		n := 1 + r.Int64N(12<<10)
		switch r.IntN(10) {
		case 0, 1, 2, 3:
			n = 1 + r.Int64N(600)
		case 4:
			n = 1 + r.Int64N(48<<10)
		}
		return hotOff + r.Int64N(hotLen-n+1), n
	}
	// Before the rollback: one request at a time.
	setupOp := func() {
		off, n := randRange(rng)
		var err error
		switch k := rng.IntN(10); {
		case k < 7:
			p := make([]byte, n)
			fillRandom(rng, p)
			err = e.WriteAt(ctx, p, off, rng.IntN(5) == 0)
			copy(model[off:], p)
		case k < 9:
			err = e.Zero(ctx, off, n, false)
			clear(model[off : off+n])
		default:
			err = e.Trim(ctx, off, n, false)
			clear(model[off : off+n])
		}
		log.add("setup op off=%d n=%d err=%v", off, n, err)
		if err != nil {
			t.Fatal(err)
		}
	}

	// Three or four snapshots, of the three cluster sizes, the first two
	// persistent, with writes after each.
	csizes := []int{4 << 10, 8 << 10, 16 << 10}
	rng.Shuffle(len(csizes), func(i, j int) { csizes[i], csizes[j] = csizes[j], csizes[i] })
	var snaps []*rbModelSnap
	for i := range 3 + rng.IntN(2) {
		ms := &rbModelSnap{name: fmt.Sprintf("s%d", i), csize: csizes[i%len(csizes)], persistent: i < 2 || rng.IntN(3) != 0}
		s, err := e.Create(ctx, mustOpen(t, fs, ms.name), SnapshotOptions{
			Name: ms.name, ClusterSize: ms.csize, Transient: !ms.persistent, OriginID: rbModelOriginID,
			CacheBytes: []int64{1, 0}[rng.IntN(2)],
		})
		log.add("create %s cs=%d persistent=%v err=%v", ms.name, ms.csize, ms.persistent, err)
		if err != nil {
			t.Fatal(err)
		}
		ms.s, ms.frozen = s, bytes.Clone(model)
		snaps = append(snaps, ms)
		for range 6 + rng.IntN(10) {
			setupOp()
		}
	}
	var src *rbModelSnap
	for src == nil || !src.persistent {
		src = snaps[rng.IntN(len(snaps))]
	}
	var total int64
	for c := range src.s.geo.count {
		if src.s.cache.copied.get(c) {
			total += int64(src.s.geo.clusterLen(c))
		}
	}
	var rate int64
	if rng.IntN(4) != 0 {
		// The copier takes 50 to 150 ms: the requests race it.
		rate = max(1, total*1000/(50+rng.Int64N(100)))
		stats.rated = 1
	}
	consume := rng.IntN(2) == 0
	restartAt := int64(-1)
	if rng.IntN(2) == 0 {
		restartAt = rng.Int64N(int64(ops))
		stats.restarted = 1
	}
	type clearEvent struct {
		at int64
		ms *rbModelSnap
	}
	var clears []clearEvent
	for _, ms := range snaps {
		if ms != src && rng.IntN(2) == 0 {
			clears = append(clears, clearEvent{rng.Int64N(int64(ops)), ms})
		}
	}

	log.add("rollback to %s (cs=%d, %d bytes) rate=%d consume=%v restart at %d, %d clears, writes to %d+%d", src.name, src.csize, total, rate, consume, restartAt, len(clears), hotOff, hotLen)
	if err := e.Rollback(ctx, src.name, mustOpen(t, fs, "progress"), RollbackOptions{Rate: rate, Consume: consume}); err != nil {
		t.Fatal(err)
	}
	copy(model, src.frozen)
	ri, ok := e.RollbackInfo()
	if !ok || ri.Snapshot != src.name || ri.UUID != src.s.hdr.UUID || ri.TotalBytes != total || ri.Rate != rate || ri.Consume != consume || ri.State == RollbackFailed {
		t.Fatalf("rollback info at the start: %+v (ok %v), want %d bytes of %s", ri, ok, total, src.name)
	}
	img := make([]byte, size)
	wantImage(t, ctx, e.ReadAt, img, model, "origin right after the rollback instant", true)

	var (
		epoch    sync.RWMutex // held shared by each request, alone by a restart
		rl       rangeLock
		snapMu   sync.Mutex
		live     = snaps // oldest first; guarded by snapMu
		done     atomic.Int64
		racing   atomic.Int64
		restores atomic.Int64
		errs     firstError
	)
	fail := errs.set
	stopped := func() bool { return errs.get() != nil }
	complete := func(e *Engine) bool {
		ri, _ := e.RollbackInfo()
		return ri.State == RollbackComplete
	}
	// A request while the rollback runs.
	request := func(e *Engine, r *rand.Rand, w int, buf []byte) {
		active := e.active()
		if active != nil {
			racing.Add(1)
		}
		switch k := r.IntN(100); {
		case k < 40, k < 50: // write; trim or write-zeroes
			off, n := writeRange(r)
			p := buf[:n]
			write := k < 40
			if write {
				fillRandom(r, p)
			} else {
				clear(p)
			}
			fua := r.IntN(6) == 0
			rl.lock(off, n)
			if active != nil && active.pendingIn(off, n) {
				restores.Add(1) // it restores clusters itself, unless the copier gets there first
			}
			var err error
			switch {
			case write:
				err = e.WriteAt(ctx, p, off, fua)
			case r.IntN(2) == 0:
				err = e.Trim(ctx, off, n, fua)
			default:
				err = e.Zero(ctx, off, n, fua)
			}
			if err == nil {
				copy(model[off:], p)
			}
			rl.unlock(off, n)
			log.add("w%d write=%v off=%d n=%d fua=%v err=%v", w, write, off, n, fua, err)
			if err != nil {
				fail(fmt.Errorf("w%d: write=%v off=%d n=%d: %w", w, write, off, n, err))
			}
		case k < 55:
			err := e.Flush(ctx)
			log.add("w%d flush err=%v", w, err)
			if err != nil {
				fail(fmt.Errorf("w%d: flush: %w", w, err))
			}
		case k < 75: // origin read: the rollback's image and the acknowledged writes
			off, n := randRange(r)
			p := buf[:n]
			rl.lock(off, n)
			err := e.ReadAt(ctx, p, off)
			if err == nil && !bytes.Equal(p, model[off:off+n]) {
				err = fmt.Errorf("differs from the reference at +%d", firstDiff(p, model[off:off+n]))
			}
			rl.unlock(off, n)
			log.add("w%d origin read off=%d n=%d err=%v", w, off, n, err)
			if err != nil {
				fail(fmt.Errorf("w%d: origin read off=%d n=%d: %w", w, off, n, err))
			}
		default: // snapshot read
			snapMu.Lock()
			ms := live[r.IntN(len(live))]
			snapMu.Unlock()
			off, n := randRange(r)
			p := buf[:n]
			err := ms.s.ReadAt(ctx, p, off)
			log.add("w%d read %s off=%d n=%d err=%v", w, ms.name, off, n, err)
			switch {
			case errors.Is(err, ErrCleared):
			case err != nil:
				fail(fmt.Errorf("w%d: read %s: %w", w, ms.name, err))
			case !bytes.Equal(p, ms.frozen[off:off+n]):
				fail(fmt.Errorf("w%d: read %s off=%d n=%d: differs from its image at +%d", w, ms.name, off, n, firstDiff(p, ms.frozen[off:off+n])))
			}
		}
	}

	workers := 2 + rng.IntN(3)
	var wg sync.WaitGroup
	for w := range workers {
		r := rand.New(rand.NewPCG(seed, uint64(w)+0x7c))
		wg.Go(func() {
			buf := make([]byte, 128<<10)
			for i := 0; !stopped(); i++ {
				epoch.RLock()
				cur := e
				if i >= ops && (i >= 20*ops || complete(cur)) {
					epoch.RUnlock()
					return
				}
				request(cur, r, w, buf)
				paced := rate > 0 && cur.active() != nil
				epoch.RUnlock()
				done.Add(1)
				if paced {
					// Requests spread over the copier's run, rather
					// than thousands of them covering the origin.
					time.Sleep(200 * time.Microsecond)
				}
			}
		})
	}

	// The controller: clears, refused operations, a restart; it samples
	// RollbackInfo between them.
	var lastRemaining = ri.RemainingBytes
	sample := func(e *Engine, when string) {
		ri, ok := e.RollbackInfo()
		stats.samples++
		switch {
		case !ok:
			fail(fmt.Errorf("%s: no rollback info", when))
		case ri.RemainingBytes > lastRemaining:
			fail(fmt.Errorf("%s: remaining bytes grew from %d to %d", when, lastRemaining, ri.RemainingBytes))
		case ri.TotalBytes != total || ri.Snapshot != src.name || ri.State == RollbackFailed || ri.Err != "":
			fail(fmt.Errorf("%s: rollback info %+v", when, ri))
		case ri.State == RollbackComplete && (ri.RemainingBytes != 0 || ri.Unsynced):
			fail(fmt.Errorf("%s: complete with %d bytes remaining, unsynced %v", when, ri.RemainingBytes, ri.Unsynced))
		}
		lastRemaining = ri.RemainingBytes
	}
	refused := func(e *Engine) {
		_, err := e.Create(ctx, mustOpen(t, fs, "refused"), SnapshotOptions{Name: "refused", OriginID: rbModelOriginID})
		errs := []error{err, e.Clear(src.name), e.Bookmark(src.name)}
		snapMu.Lock()
		for _, ms := range live {
			if ms.persistent {
				errs = append(errs, e.Rollback(ctx, ms.name, mustOpen(t, fs, "progress2"), RollbackOptions{}))
				break
			}
		}
		snapMu.Unlock()
		for i, err := range errs {
			if !errors.Is(err, ErrRollback) {
				fail(fmt.Errorf("refused operation %d during the rollback: %v, want ErrRollback", i, err))
			}
		}
		if pf, err := backstore.OpenProgress(mustOpen(t, fs, "progress2")); !errors.Is(err, backstore.ErrNoProgress) {
			fail(fmt.Errorf("a refused second rollback left a progress file: %v", err))
			if err == nil {
				pf.Close()
			}
		}
		log.add("refused operations checked")
	}
	restart := func() {
		epoch.Lock()
		defer epoch.Unlock()
		sample(e, "before the restart")
		if err := e.Close(); err != nil {
			fail(fmt.Errorf("close: %w", err))
			return
		}
		ne, err := NewEngine(origin, EngineOptions{})
		if err != nil {
			fail(err)
			return
		}
		e = ne
		snapMu.Lock()
		var kept []*rbModelSnap
		for _, ms := range live {
			if !ms.persistent {
				continue // a transient snapshot ends with its engine
			}
			f, err := fs.OpenFile(ms.name, os.O_RDWR, 0)
			if err != nil {
				fail(err)
				break
			}
			s, err := e.Reopen(ctx, f, ReopenOptions{OriginID: rbModelOriginID})
			if err != nil {
				fail(fmt.Errorf("reopen %s: %w", ms.name, err))
				break
			}
			ms.s = s
			kept = append(kept, ms)
		}
		live = kept
		snapMu.Unlock()
		pf, err := fs.OpenFile("progress", os.O_RDWR, 0)
		if err != nil {
			fail(err)
			return
		}
		prog, err := backstore.OpenProgress(pf)
		if err != nil {
			fail(fmt.Errorf("open progress: %w", err))
			return
		}
		if err := e.ResumeRollback(prog); err != nil {
			fail(fmt.Errorf("resume: %w", err))
			return
		}
		// A clean stop records every restored cluster: nothing is
		// restored twice.
		sample(e, "after the restart")
		got := make([]byte, size)
		if err := e.ReadAt(ctx, got, 0); err != nil {
			fail(fmt.Errorf("read origin after the restart: %w", err))
		} else if !bytes.Equal(got, model) {
			fail(fmt.Errorf("origin after the restart differs from the reference at %d", firstDiff(got, model)))
		}
		log.add("restart: resumed with %d bytes to restore", lastRemaining)
	}
	workersDone := make(chan struct{})
	go func() {
		wg.Wait()
		close(workersDone)
	}()
	probed := false
	for running := true; running; {
		select {
		case <-workersDone:
			running = false
		case <-time.After(500 * time.Microsecond):
		}
		if stopped() {
			continue
		}
		n := done.Load()
		epoch.RLock()
		sample(e, fmt.Sprintf("after %d requests", n))
		if !probed {
			probed = true
			refused(e)
		}
		var due []clearEvent
		for i := 0; i < len(clears); {
			if clears[i].at <= n || !running {
				due = append(due, clears[i])
				clears = append(clears[:i], clears[i+1:]...)
				continue
			}
			i++
		}
		for _, c := range due {
			found := false
			snapMu.Lock()
			for i, ms := range live {
				if ms == c.ms {
					live = append(live[:i:i], live[i+1:]...)
					found = true
					break
				}
			}
			snapMu.Unlock()
			if !found {
				continue // transient, ended by a restart
			}
			verifySnap(ctx, &modelSnap{s: c.ms.s, frozen: c.ms.frozen, name: c.ms.name}, false, fail)
			err := e.Clear(c.ms.name)
			log.add("clear %s during the rollback err=%v", c.ms.name, err)
			if err != nil {
				fail(fmt.Errorf("clear %s: %w", c.ms.name, err))
			}
			stats.cleared++
		}
		epoch.RUnlock()
		if restartAt >= 0 && n >= restartAt {
			restartAt = -1
			restart()
		}
	}
	stats.racing, stats.writesRestoring = racing.Load(), restores.Load()
	if errs.get() != nil {
		t.Fatalf("seed %d: %v", seed, errs.get())
	}

	select {
	case <-e.RollbackDone():
	case <-time.After(30 * time.Second):
		t.Fatalf("seed %d: the rollback did not end", seed)
	}
	sample(e, "at the end")
	if errs.get() != nil {
		t.Fatalf("seed %d: %v", seed, errs.get())
	}
	if ri, _ := e.RollbackInfo(); ri.State != RollbackComplete || ri.RemainingBytes != 0 || ri.Unsynced {
		t.Fatalf("seed %d: rollback info at the end: %+v", seed, ri)
	}
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.EndRollback(); err != nil {
		t.Fatalf("end rollback: %v", err)
	}
	if _, ok := e.RollbackInfo(); ok {
		t.Fatalf("rollback info after its end")
	}
	phys := make([]byte, size)
	if err := readFull(origin, phys, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(phys, model) {
		t.Fatalf("seed %d: the origin file differs from the reference at %d", seed, firstDiff(phys, model))
	}
	srcLive := false
	for _, ms := range live {
		srcLive = srcLive || ms == src
		if info := ms.s.Info(); !info.Valid {
			t.Fatalf("seed %d: %s invalid: %s", seed, ms.name, info.Reason)
		}
		wantImage(t, ctx, ms.s.ReadAt, img, ms.frozen, fmt.Sprintf("snapshot %s after the rollback", ms.name), true)
	}
	if !srcLive {
		t.Fatalf("seed %d: the rollback's snapshot is gone", seed)
	}
	// The engine goes on as usual: a snapshot of the rolled-back origin.
	s, err := e.Create(ctx, mustOpen(t, fs, "after"), SnapshotOptions{Name: "after", ClusterSize: 4096, OriginID: rbModelOriginID})
	if err != nil {
		t.Fatalf("create after the rollback: %v", err)
	}
	p := bytes.Repeat([]byte{0xA5}, 10000)
	if err := e.WriteAt(ctx, p, size/3, false); err != nil {
		t.Fatal(err)
	}
	wantImage(t, ctx, s.ReadAt, img, model, "snapshot taken after the rollback", true)
	copy(model[size/3:], p)
	wantImage(t, ctx, e.ReadAt, img, model, "origin after the rollback", true)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	return stats
}
