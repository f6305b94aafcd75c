package cow

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

var rbCrashesFlag = flag.Int("rollback-crashes", 0, "crash points TestRollbackCrash checks (0: 160, or 100 with -short)")

const rbCrashOriginID = "rbcrash"

var rbOnes = func() (b [4096]byte) {
	for i := range b {
		b[i] = 1
	}
	return b
}()

// rbHalf is one writer's half of the origin in a rollback crash workload,
// tracked as crashWorker is (crash_test.go): cur as acknowledged, durable
// as of the last completed FLUSH (or FUA write), dirty the bytes written
// since, and since those writes.
type rbHalf struct {
	lo, hi  int64
	cur     []byte
	durable []byte
	dirty   []byte
	since   []crashWrite
}

// rbCrashSnap is a snapshot of the workload and what recovery must show.
type rbCrashSnap struct {
	name        string
	uuid        string
	csize       int
	persistent  bool
	frozen      []byte
	clearIssued bool // guarded by rbCrashRun.mu
}

// rbCrashState is what the crash hook captures, all of it under
// rbCrashRun.mu held across the clone: a request acknowledged in it
// returned before the clone was taken, and one not marked issued in it
// had not started.
type rbCrashState struct {
	op       vfstest.Op
	clone    *vfstest.MemFS
	durable  [][]byte
	dirty    [][]byte
	since    [][]crashWrite
	returned bool // Rollback had returned success
	removed  bool // the progress file's removal was issued (after EndRollback)
	cleared  map[string]bool
}

// rbCrashRun is one crash point of TestRollbackCrash.
type rbCrashRun struct {
	log  *opLog
	ctx  context.Context
	size int64
	e    *Engine
	src  *rbCrashSnap

	mu       sync.Mutex // guards what follows; the crash hook holds it
	halves   []*rbHalf
	snaps    []*rbCrashSnap
	returned bool
	removed  bool
	state    *rbCrashState
}

// rbCrashResult classifies a crash point by what recovery found.
type rbCrashResult struct {
	uncommitted  int // no rollback in the progress file: the crash came before its commit
	early        int // committed, crash before Rollback returned
	resumed      int // committed and resumed with clusters still to restore
	finished     int // committed, nothing left to restore (or ended and removed)
	rated        int // runs whose copier was rate-bounded
	mutationsMax int64
}

func (r *rbCrashResult) add(o rbCrashResult) {
	r.uncommitted += o.uncommitted
	r.early += o.early
	r.resumed += o.resumed
	r.finished += o.finished
	r.rated += o.rated
	r.mutationsMax = max(r.mutationsMax, o.mutationsMax)
}

// issue records a request before it is issued: its bytes may be on disk
// from now on.
func (run *rbCrashRun) issue(h *rbHalf, off int64, data []byte) {
	run.mu.Lock()
	defer run.mu.Unlock()
	rel := off - h.lo
	dirty := h.dirty[rel : rel+int64(len(data))]
	for len(dirty) > 0 {
		dirty = dirty[copy(dirty, rbOnes[:]):]
	}
	h.since = append(h.since, crashWrite{rel, bytes.Clone(data)})
}

// acked records a request that returned success.
func (run *rbCrashRun) acked(h *rbHalf, off int64, data []byte, fua bool) {
	run.mu.Lock()
	defer run.mu.Unlock()
	copy(h.cur[off-h.lo:], data)
	if fua {
		copy(h.durable[off-h.lo:], data)
	}
}

// flushed records a completed FLUSH of a half whose writer issued nothing
// during it: everything acknowledged before it (before) is durable.
func (run *rbCrashRun) flushed(h *rbHalf, before []byte) {
	run.mu.Lock()
	defer run.mu.Unlock()
	copy(h.durable, before)
	clear(h.dirty)
	h.since = nil
}

// reset makes img the content of every half, durable and with nothing
// written since: a create instant (which syncs the origin) or a returned
// rollback (whose instant made the snapshot's image the origin's).
func (run *rbCrashRun) reset(img []byte) {
	run.mu.Lock()
	defer run.mu.Unlock()
	for _, h := range run.halves {
		copy(h.cur, img[h.lo:h.hi])
		copy(h.durable, img[h.lo:h.hi])
		clear(h.dirty)
		h.since = nil
	}
}

// image is the origin as acknowledged.
func (run *rbCrashRun) image() []byte {
	run.mu.Lock()
	defer run.mu.Unlock()
	img := make([]byte, run.size)
	for _, h := range run.halves {
		copy(img[h.lo:], h.cur)
	}
	return img
}

// request issues a random write, write-zeroes or trim (FUA or not) of at
// most three clusters of a random size within h.
func (run *rbCrashRun) request(r *rand.Rand, h *rbHalf, who string) error {
	n := 1 + r.Int64N(3*int64(crashClusterSizes[r.IntN(len(crashClusterSizes))]))
	n = min(n, h.hi-h.lo)
	off := h.lo + r.Int64N(h.hi-h.lo-n+1)
	kind := r.IntN(10)
	fua := r.IntN(6) == 0
	data := make([]byte, n)
	if kind < 7 {
		fillRandom(r, data)
	}
	run.issue(h, off, data)
	var err error
	switch {
	case kind < 7:
		err = run.e.WriteAt(run.ctx, data, off, fua)
	case kind < 9:
		err = run.e.Zero(run.ctx, off, n, fua)
	default:
		err = run.e.Trim(run.ctx, off, n, fua)
	}
	run.log.add("%s op%d off=%d n=%d fua=%v err=%v", who, kind, off, n, fua, err)
	if err != nil {
		return fmt.Errorf("%s: request off=%d n=%d: %w", who, off, n, err)
	}
	run.acked(h, off, data, fua)
	return nil
}

// flush flushes the engine on behalf of h's writer.
func (run *rbCrashRun) flush(h *rbHalf, who string) error {
	run.mu.Lock()
	before := bytes.Clone(h.cur)
	run.mu.Unlock()
	err := run.e.Flush(run.ctx)
	run.log.add("%s flush err=%v", who, err)
	if err != nil {
		return fmt.Errorf("%s: flush: %w", who, err)
	}
	run.flushed(h, before)
	return nil
}

// runRollbackCrash runs one workload: snapshots of mixed cluster sizes
// with writes between them, then a rollback to one of them (its copier
// sometimes rate-bounded) while two writers issue writes, write-zeroes and
// trims, FUA or not, and FLUSHes, and another snapshot is cleared; once
// the rollback completed it is sometimes ended and its progress file
// removed. The crash is the k-th mutation after the rollback was asked
// for. It returns an error rather than failing the test, so that crash
// points run in parallel.
func runRollbackCrash(seed uint64, k int64, log *opLog) (res rbCrashResult, err error) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0xc0))
	const size = 64<<10 + 1000
	fs := vfstest.NewMemFS()
	open := func(name string) (vfs.File, error) { return fs.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644) }
	origin, err := open("origin")
	if err != nil {
		return res, err
	}
	initImg := make([]byte, size)
	fillRandom(rng, initImg)
	if _, err := origin.WriteAt(initImg, 0); err != nil {
		return res, err
	}
	if err := origin.Sync(); err != nil {
		return res, err
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		return res, err
	}
	defer e.Close() // a second Close does nothing
	run := &rbCrashRun{log: log, ctx: ctx, size: size, e: e}
	for _, b := range [][2]int64{{0, size / 2}, {size / 2, size}} {
		run.halves = append(run.halves, &rbHalf{
			lo: b[0], hi: b[1],
			cur:     bytes.Clone(initImg[b[0]:b[1]]),
			durable: bytes.Clone(initImg[b[0]:b[1]]),
			dirty:   make([]byte, b[1]-b[0]),
		})
	}

	// Before the rollback: two or three persistent snapshots and maybe a
	// transient one, with writes (and some FLUSHes) after each.
	npers := 2 + rng.IntN(2)
	transientAt := -1
	if rng.IntN(2) == 0 {
		transientAt = rng.IntN(npers + 1)
	}
	for i := range npers + 1 {
		if i == npers && transientAt < 0 {
			break
		}
		persistent := i != transientAt
		cs := crashClusterSizes[rng.IntN(len(crashClusterSizes))]
		name := fmt.Sprintf("s%d", i)
		f, err := open(name)
		if err != nil {
			return res, err
		}
		frozen := run.image()
		s, err := e.Create(ctx, f, SnapshotOptions{Name: name, ClusterSize: cs, Transient: !persistent, OriginID: rbCrashOriginID})
		log.add("create %s cs=%d persistent=%v err=%v", name, cs, persistent, err)
		if err != nil {
			return res, fmt.Errorf("create %s: %w", name, err)
		}
		run.reset(frozen) // the create instant syncs the origin
		run.snaps = append(run.snaps, &rbCrashSnap{name: name, uuid: s.Info().UUID, csize: cs, persistent: persistent, frozen: frozen})
		for range 3 + rng.IntN(8) {
			h := run.halves[rng.IntN(2)]
			if rng.IntN(5) == 0 {
				err = run.flush(h, "setup")
			} else {
				err = run.request(rng, h, "setup")
			}
			if err != nil {
				return res, err
			}
		}
	}
	var persistent []*rbCrashSnap
	for _, s := range run.snaps {
		if s.persistent {
			persistent = append(persistent, s)
		}
	}
	src := persistent[rng.IntN(len(persistent))]
	run.src = src
	var victim *rbCrashSnap
	if rng.IntN(3) != 0 {
		for _, i := range rng.Perm(len(run.snaps)) {
			if run.snaps[i] != src {
				victim = run.snaps[i]
				break
			}
		}
	}
	ss, _ := e.Snapshot(src.name)
	var todo int64
	for c := range ss.geo.count {
		if ss.cache.copied.get(c) {
			todo += int64(ss.geo.clusterLen(c))
		}
	}
	var rate int64
	if rng.IntN(4) != 0 {
		// The copier takes 2 to 12 ms: the writers' requests race it.
		rate = max(1, todo*1000/(2+rng.Int64N(11)))
		res.rated = 1
	}
	endIt := rng.IntN(2) == 0
	progress, err := open("progress")
	if err != nil {
		return res, err
	}

	// The crash: mutation k from here on.
	copts := vfstest.CrashOptions{
		Rand:            rand.New(rand.NewPCG(seed, 0xc1)),
		KeepProbability: rng.Float64(),
		TornWrites:      rng.IntN(2) == 0,
	}
	// A transient snapshot's writer may mutate the file system at any
	// time: the crash is the first mutation numbered base+k or more.
	var crashAt atomic.Int64
	crashAt.Store(math.MaxInt64)
	var crashed atomic.Bool
	fs.OnOp(func(op vfstest.Op) {
		if op.Seq < crashAt.Load() {
			return
		}
		run.mu.Lock()
		defer run.mu.Unlock()
		if run.state != nil {
			return
		}
		st := &rbCrashState{op: op, returned: run.returned, removed: run.removed, cleared: map[string]bool{}}
		for _, h := range run.halves {
			st.durable = append(st.durable, bytes.Clone(h.durable))
		}
		for _, s := range run.snaps {
			st.cleared[s.name] = s.clearIssued
		}
		st.clone = fs.CrashClone(copts)
		for _, h := range run.halves {
			st.dirty = append(st.dirty, bytes.Clone(h.dirty))
			st.since = append(st.since, slices.Clone(h.since))
		}
		run.state = st
		crashed.Store(true)
		log.add("--- the crash: before %v", op)
	})
	defer fs.OnOp(nil)
	base := fs.MutationCount()
	crashAt.Store(base + k)

	log.add("rollback to %s (cs=%d, %d bytes to restore) rate=%d victim=%v end=%v; crash at mutation %d after it",
		src.name, src.csize, todo, rate, victim != nil, endIt, k)
	if err := e.Rollback(ctx, src.name, progress, RollbackOptions{Rate: rate}); err != nil {
		return res, fmt.Errorf("rollback: %w", err)
	}
	run.mu.Lock()
	run.returned = true
	run.mu.Unlock()
	run.reset(src.frozen)

	var errs firstError
	fail := errs.set
	failed := func() bool { return errs.get() != nil }
	var copierDone atomic.Bool
	var wg sync.WaitGroup
	for wi, h := range run.halves {
		r := rand.New(rand.NewPCG(seed, uint64(wi)+0xc2))
		who := fmt.Sprintf("w%d", wi)
		wg.Go(func() {
			for i := 0; !failed(); i++ {
				if i >= 6 && crashed.Load() && copierDone.Load() {
					return
				}
				if i == crashMaxOps {
					fail(fmt.Errorf("%s did %d operations without reaching the crash point", who, i))
					return
				}
				var err error
				if r.IntN(100) < 15 {
					err = run.flush(h, who)
				} else {
					err = run.request(r, h, who)
				}
				if err != nil {
					fail(err)
					return
				}
				if !copierDone.Load() {
					// Requests spread over the copier's run, which is
					// bounded by time, not by processors.
					time.Sleep(150 * time.Microsecond)
				}
			}
		})
	}
	if victim != nil {
		time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		run.mu.Lock()
		victim.clearIssued = true
		run.mu.Unlock()
		err := e.Clear(victim.name)
		log.add("clear %s err=%v", victim.name, err)
		if err != nil {
			fail(fmt.Errorf("clear %s: %w", victim.name, err))
		} else if err := fs.Remove(victim.name); err != nil {
			fail(err)
		}
	}
	select {
	case <-e.RollbackDone():
	case <-time.After(20 * time.Second):
		fail(errors.New("the rollback did not end"))
	}
	copierDone.Store(true)
	if ri, _ := e.RollbackInfo(); ri.State != RollbackComplete || ri.RemainingBytes != 0 {
		fail(fmt.Errorf("rollback ended as %+v", ri))
	}
	if endIt && !failed() {
		err := e.EndRollback()
		log.add("end rollback err=%v", err)
		if err != nil {
			fail(fmt.Errorf("end rollback: %w", err))
		} else {
			run.mu.Lock()
			run.removed = true
			run.mu.Unlock()
			if err := fs.Remove("progress"); err != nil {
				fail(err)
			}
		}
	}
	wg.Wait()
	res.mutationsMax = fs.MutationCount() - base
	if err := e.Close(); err != nil {
		fail(fmt.Errorf("close: %w", err))
	}
	if errs.get() != nil {
		return res, errs.get()
	}
	run.mu.Lock()
	st := run.state
	run.mu.Unlock()
	if st == nil {
		return res, fmt.Errorf("the workload ended before its crash point")
	}
	log.add("crash at %v: rollback returned=%v, progress removed=%v, cleared=%v", st.op, st.returned, st.removed, st.cleared)
	return run.recover(st, res)
}

// recover reopens what the crash left, as the daemon does at its start:
// the snapshots first, then the progress file (a rollback that was never
// committed is no rollback), resuming a committed rollback; and checks it.
func (run *rbCrashRun) recover(st *rbCrashState, res rbCrashResult) (rbCrashResult, error) {
	ctx := run.ctx
	origin, err := st.clone.OpenFile("origin", os.O_RDWR, 0)
	if err != nil {
		return res, fmt.Errorf("recovery: open origin: %w", err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		return res, err
	}
	defer e.Close()
	img := make([]byte, run.size)
	var reopened []*Snapshot
	var refs []*rbCrashSnap
	checkSnaps := func(when string) error {
		for i, s := range reopened {
			if err := s.ReadAt(ctx, img, 0); err != nil {
				return fmt.Errorf("recovery: read %s %s: %w", refs[i].name, when, err)
			}
			if !bytes.Equal(img, refs[i].frozen) {
				return fmt.Errorf("recovery: %s differs from its reference at %d %s", refs[i].name, firstDiff(img, refs[i].frozen), when)
			}
		}
		return nil
	}
	for _, cs := range run.snaps {
		if !cs.persistent || st.cleared[cs.name] {
			continue
		}
		f, err := st.clone.OpenFile(cs.name, os.O_RDWR, 0)
		if err != nil {
			return res, fmt.Errorf("recovery: store of %s: %w", cs.name, err)
		}
		s, err := e.Reopen(ctx, f, ReopenOptions{OriginID: rbCrashOriginID})
		if err != nil {
			return res, fmt.Errorf("recovery: reopen %s: %w", cs.name, err)
		}
		if info := s.Info(); !info.Valid {
			return res, fmt.Errorf("recovery: %s invalid: %s", cs.name, info.Reason)
		}
		reopened = append(reopened, s)
		refs = append(refs, cs)
	}
	if err := checkSnaps("after the reopen"); err != nil {
		return res, err
	}

	committed, resumed := false, false
	pf, err := st.clone.OpenFile("progress", os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if !st.removed {
			return res, errors.New("recovery: the progress file is gone, and was never removed")
		}
		committed = true // complete, ended, removed
		res.finished++
	case err != nil:
		return res, err
	default:
		prog, err := backstore.OpenProgress(pf)
		switch {
		case errors.Is(err, backstore.ErrNoProgress):
			pf.Close()
			if st.returned {
				return res, errors.New("recovery: Rollback returned success before the crash, but its progress file holds no committed rollback")
			}
			res.uncommitted++
		case err != nil:
			pf.Close()
			return res, fmt.Errorf("recovery: open progress: %w", err)
		default:
			committed = true
			if got := prog.Info().UUID.String(); got != run.src.uuid {
				return res, fmt.Errorf("recovery: the progress file names store %s, the rollback's snapshot is %s", got, run.src.uuid)
			}
			switch {
			case !st.returned:
				res.early++
			case prog.Done() < prog.Info().Entries:
				res.resumed++
			default:
				res.finished++
			}
			if err := e.ResumeRollback(prog); err != nil {
				prog.Close()
				return res, fmt.Errorf("recovery: resume rollback: %w", err)
			}
			resumed = true
		}
	}

	// The origin as the recovered engine shows it, against the NBD
	// contract: a byte written since the last completed FLUSH holds its
	// value at that FLUSH or one of those writes'; any other byte its value
	// at that FLUSH. A committed rollback's instant counts as a FLUSH that
	// made the snapshot's image the origin's: no byte may hold what it held
	// before the rollback, unless a later write put it back.
	if err := e.ReadAt(ctx, img, 0); err != nil {
		return res, fmt.Errorf("recovery: read origin: %w", err)
	}
	logical := bytes.Clone(img)
	for i, h := range run.halves {
		durable, dirty, since := st.durable[i], st.dirty[i], st.since[i]
		if committed && !st.returned {
			// Committed by the crash itself, before Rollback returned:
			// nothing was written after the instant.
			durable, dirty, since = run.src.frozen[h.lo:h.hi], make([]byte, h.hi-h.lo), nil
		}
		got := logical[h.lo:h.hi]
		for a := 0; a < len(dirty); {
			if dirty[a] != 0 {
				if !writtenSince(got[a], durable[a], since, int64(a)) {
					return res, fmt.Errorf("recovery (rollback committed=%v): origin byte %d holds %#x: neither its value %#x at the last FLUSH nor that of a write issued since",
						committed, h.lo+int64(a), got[a], durable[a])
				}
				a++
				continue
			}
			b := len(dirty)
			if j := bytes.IndexByte(dirty[a:], 1); j >= 0 {
				b = a + j
			}
			if !bytes.Equal(got[a:b], durable[a:b]) {
				j := a + firstDiff(got[a:b], durable[a:b])
				return res, fmt.Errorf("recovery (rollback committed=%v): origin byte %d lost its value at the last FLUSH (got %x, want %x)",
					committed, h.lo+int64(j), got[j:min(b, j+8)], durable[j:min(b, j+8)])
			}
			a = b
		}
	}
	if !resumed {
		return res, nil
	}
	select {
	case <-e.RollbackDone():
	case <-time.After(20 * time.Second):
		return res, errors.New("recovery: the resumed rollback did not end")
	}
	if ri, _ := e.RollbackInfo(); ri.State != RollbackComplete || ri.RemainingBytes != 0 {
		return res, fmt.Errorf("recovery: the resumed rollback ended as %+v", ri)
	}
	if err := e.EndRollback(); err != nil {
		return res, err
	}
	if err := readFull(origin, img, 0); err != nil {
		return res, err
	}
	if !bytes.Equal(img, logical) {
		return res, fmt.Errorf("recovery: once the resumed rollback completed, the origin file differs at %d from what the engine showed", firstDiff(img, logical))
	}
	return res, checkSnaps("after the resumed rollback")
}

// TestRollbackCrash crashes rollbacks at many points (one per seed: the
// k-th mutating operation after the rollback was asked for, keeping a
// random part of the unsynced writes, possibly torn), recovers as the
// daemon does (reopen the snapshots, open the progress file, resume a
// committed rollback) and checks: a Rollback that returned is committed;
// every persistent snapshot not being cleared reopens equal to its
// reference, before and after the resumed rollback; and the origin keeps
// the NBD crash contract, the committed rollback instant counting as a
// FLUSH that made the snapshot's image the origin's (so no cluster shows
// pre-rollback data, nor a mix of it with the snapshot's). The crash
// points run in parallel; -rollback-crashes N checks N of them, -seed
// replays one.
func TestRollbackCrash(t *testing.T) {
	want := 160
	if testing.Short() {
		want = 100
	}
	if *rbCrashesFlag > 0 {
		want = *rbCrashesFlag
	}
	base := uint64(0xc7a5b)
	if *seedFlag != 0 {
		want, base = 1, *seedFlag
	}
	type outcome struct {
		seed, k uint64
		log     *opLog
		res     rbCrashResult
		err     error
	}
	seedsCh := make(chan uint64)
	results := make(chan outcome)
	var wg sync.WaitGroup
	// A workload waits for its copier much of the time: run more of them
	// than there are processors.
	for range 4 * runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for seed := range seedsCh {
				r := rand.New(rand.NewPCG(seed, 13))
				// Most crash points fall while the rollback runs (its
				// commit is mutation 5, its copy takes some 20 to 80),
				// the rest after it.
				var k int64
				switch r.IntN(8) {
				case 0, 1:
					k = 1 + r.Int64N(8)
				case 2:
					k = 50 + r.Int64N(80)
				default:
					k = 1 + r.Int64N(50)
				}
				log := &opLog{}
				res, err := runRollbackCrash(seed, k, log)
				results <- outcome{seed, uint64(k), log, res, err}
			}
		})
	}
	go func() {
		for i := range want {
			seedsCh <- base + uint64(i)
		}
		close(seedsCh)
		wg.Wait()
		close(results)
	}()
	var total rbCrashResult
	var failures []outcome
	for o := range results {
		if o.err != nil {
			failures = append(failures, o)
			continue
		}
		total.add(o.res)
	}
	if len(failures) > 0 {
		slices.SortFunc(failures, func(a, b outcome) int { return cmp.Compare(a.seed, b.seed) })
		for _, o := range failures[:min(3, len(failures))] {
			o.log.add("crash point: mutation %d after the rollback was asked for", o.k)
			o.log.keep(t, o.seed)
			t.Errorf("seed %d, crash at mutation %d after the rollback was asked for: %v", o.seed, o.k, o.err)
		}
		t.Fatalf("%d of %d crash points failed", len(failures), want)
	}
	t.Logf("%d crash points: %d before the commit, %d committed before Rollback returned, %d resumed mid-way, %d after the copy was complete; %d with a rate-bounded copier; up to %d mutations per workload",
		want, total.uncommitted, total.early, total.resumed, total.finished, total.rated, total.mutationsMax)
	if *seedFlag == 0 && (total.uncommitted == 0 || total.resumed == 0 || total.finished == 0) {
		t.Errorf("the crash points miss a phase of the rollback")
	}
}

// TestRollbackFUAWriteBehindCopier: a FUA write to a cluster the copier
// has just restored returns only once that restore is recorded durably,
// so that a crash right after it cannot restore the cluster again over
// the acknowledged write. The writer here follows the copier closely: it
// waits until the copier marks its next cluster done and writes it at
// once with FUA, while other goroutines contend for the progress record's
// lock (Progress.Done; in the daemon, concurrent restores and checkpoints
// take it too), which widens any window between done(c) and the record.
// Reproduces a bug: restore set done(c) before it marked c in the progress
// record, so a write that found done(c) set in between went on, and its
// FUA checkpoint did not record c.
func TestRollbackFUAWriteBehindCopier(t *testing.T) {
	ctx := context.Background()
	const size = 512 << 10
	deadline := time.Now().Add(600 * time.Millisecond)
	tries := 0
	for iter := 0; iter < 8 && time.Now().Before(deadline); iter++ {
		fs := vfstest.NewMemFS()
		e, _, data := testEngine(t, fs, size, uint64(iter)+40, true)
		if _, err := e.Create(ctx, mustOpen(t, fs, "a"), SnapshotOptions{Name: "a", ClusterSize: 4096, OriginID: "o"}); err != nil {
			t.Fatal(err)
		}
		if err := e.WriteAt(ctx, make([]byte, size), 0, false); err != nil {
			t.Fatal(err)
		}
		if err := e.Rollback(ctx, "a", mustOpen(t, fs, "progress"), RollbackOptions{}); err != nil {
			t.Fatal(err)
		}
		rb := e.rb.Load()
		var stop atomic.Bool
		var wg sync.WaitGroup
		for range 3 {
			wg.Go(func() {
				for !stop.Load() {
					rb.prog.Done()
				}
			})
		}
		var lost string
	follow:
		for {
			c := uint32(0)
			for c < rb.geo.count && rb.done.get(c) {
				c++
			}
			if c >= rb.geo.count-1 {
				break
			}
			for !rb.done.get(c) {
				select {
				case <-rb.finished:
					break follow
				default:
				}
			}
			off := rb.geo.off(c)
			p := []byte{^data[off]}
			if err := e.WriteAt(ctx, p, off, true); err != nil {
				t.Fatal(err)
			}
			tries++
			// Power fails now: only what was synced survives.
			clone := fs.CrashClone(vfstest.CrashOptions{})
			pf, err := clone.OpenFile("progress", os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			prog, err := backstore.OpenProgress(pf)
			if err != nil {
				t.Fatal(err)
			}
			if !prog.Restored(c) {
				lost = fmt.Sprintf("a FUA write to cluster %d returned, but the cluster is not recorded restored: %s",
					c, rbRecoverByte(ctx, clone, prog, off, p[0]))
				break
			}
			pf.Close()
		}
		stop.Store(true)
		wg.Wait()
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		if lost != "" {
			t.Fatal(lost)
		}
	}
	t.Logf("%d FUA writes right behind the copier", tries)
}

// rbRecoverByte recovers the engine a crash left in clone (snapshot "a",
// origin ID "o", the progress prog) and says what the byte at off holds
// once the resumed rollback completed.
func rbRecoverByte(ctx context.Context, clone *vfstest.MemFS, prog *backstore.Progress, off int64, written byte) string {
	origin, err := clone.OpenFile("origin", os.O_RDWR, 0)
	if err != nil {
		return err.Error()
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		return err.Error()
	}
	defer e.Close()
	f, err := clone.OpenFile("a", os.O_RDWR, 0)
	if err != nil {
		return err.Error()
	}
	if _, err := e.Reopen(ctx, f, ReopenOptions{OriginID: "o"}); err != nil {
		return err.Error()
	}
	if err := e.ResumeRollback(prog); err != nil {
		return err.Error()
	}
	select {
	case <-e.RollbackDone():
	case <-time.After(10 * time.Second):
		return "the resumed rollback did not end"
	}
	b := make([]byte, 1)
	if err := e.ReadAt(ctx, b, off); err != nil {
		return err.Error()
	}
	if b[0] == written {
		return "yet the write survived the recovery"
	}
	return fmt.Sprintf("after a crash and the resumed rollback, the byte at %d holds %#x, not the %#x written", off, b[0], written)
}

// TestRollbackTornProgressHeader: a crash while Rollback commits (its
// progress header written, its sync not returned) may tear the header's
// write, some 512-byte sectors kept and others not. Rollback never
// returned and no origin write of it was issued, so the file must hold no
// rollback (ErrNoProgress) or the whole one: never a header that reads as
// corrupt, which the daemon refuses to start with (daemon.openProgress).
// Kills a commit point spread over more than one sector.
func TestRollbackTornProgressHeader(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	e, _, _ := testEngine(t, fs, 256<<10, 5, true)
	defer e.Close()
	if _, err := e.Create(ctx, mustOpen(t, fs, "a"), SnapshotOptions{Name: "a", ClusterSize: 4096, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, make([]byte, 64<<10), 0, false); err != nil {
		t.Fatal(err)
	}
	var clones []*vfstest.MemFS
	syncs := 0
	fs.OnOp(func(op vfstest.Op) {
		if op.Kind != vfstest.OpSync || op.Name != "progress" {
			return
		}
		if syncs++; syncs != 2 {
			return
		}
		// The header's sync: the header write is pending.
		for i := range 64 {
			clones = append(clones, fs.CrashClone(vfstest.CrashOptions{Rand: rand.New(rand.NewPCG(uint64(i), 1)), TornWrites: true}))
		}
	})
	if err := e.Rollback(ctx, "a", mustOpen(t, fs, "progress"), RollbackOptions{Rate: 1}); err != nil {
		t.Fatal(err)
	}
	fs.OnOp(nil)
	if len(clones) == 0 {
		t.Fatal("the header's sync was not reached")
	}
	var none, whole int
	for i, clone := range clones {
		pf, err := clone.OpenFile("progress", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = backstore.OpenProgress(pf)
		switch {
		case errors.Is(err, backstore.ErrNoProgress):
			none++
		case err != nil:
			t.Fatalf("crash %d while the progress header was committed: %v", i, err)
		default:
			whole++
		}
		pf.Close()
	}
	if none == 0 || whole == 0 {
		t.Errorf("%d crashes left no rollback and %d the whole one: the crashes do not cover both", none, whole)
	}
}
