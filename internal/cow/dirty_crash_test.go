package cow

import (
	"bytes"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// dirtyCrashRec is a record as the crash instant saw it.
type dirtyCrashRec struct {
	issued, done                        []bool
	created, clearIssued, cleared       bool
	bookmarkIssued, bookmark, attempted bool
}

// dirtyCrashState is what the crash hook captures: the file system a crash
// leaves and the model at that instant. The hook holds the model's lock
// while it captures both, so a request marked done in it returned before
// the clone was taken, and one not marked issued had not started.
type dirtyCrashState struct {
	clone *vfstest.MemFS
	recs  map[*dirtyRec]dirtyCrashRec
	op    vfstest.Op
}

// dirtyCrashResult summarises one crash point's recovery.
type dirtyCrashResult struct {
	stats              dirtyStats
	reopened, refused  int
	withBases, tracked int
}

// runDirtyCrash runs a random workload of writes, trims, write-zeroes,
// creates, clears, bookmarks and clean restarts, crashes it at its k-th
// mutating operation (keeping a random part of the unsynced writes,
// possibly torn), reopens every store file the crash left that opens, and
// checks every pair the recovered engine advertises.
func runDirtyCrash(t *testing.T, seed uint64, k int64) (res dirtyCrashResult) {
	t.Helper()
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.add("crash point: mutation %d of the workload", k)
			log.keep(t, seed)
			t.Logf("replay: DIRTY_SEED=%d go test -race -run '%s' ./internal/cow/", seed, t.Name())
		}
	}()
	cfg := dirtyConfig{
		size: 96<<10 + 1000, csizes: []int{4 << 10, 16 << 10, 8 << 10}, maxLive: 6, names: 8,
		transient: 0.2, maxSize: 0.2,
	}
	w := newDirtyWorld(t, seed, cfg, log)
	rng := rand.New(rand.NewPCG(seed, 0xc4a5))
	copts := vfstest.CrashOptions{Rand: rand.New(rand.NewPCG(seed, 0xc4a6)), KeepProbability: rng.Float64(), TornWrites: rng.IntN(2) == 0}
	crashAt := w.fs.MutationCount() + k
	var st *dirtyCrashState
	w.fs.OnOp(func(op vfstest.Op) {
		if op.Seq != crashAt {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		cs := &dirtyCrashState{recs: map[*dirtyRec]dirtyCrashRec{}, op: op}
		for _, r := range w.all {
			cs.recs[r] = dirtyCrashRec{
				issued: slices.Clone(r.issued), done: slices.Clone(r.done),
				created: r.created, clearIssued: r.clearIssued, cleared: r.cleared,
				bookmarkIssued: r.bookmarkIssued, bookmark: r.bookmark, attempted: true,
			}
		}
		cs.clone = w.fs.CrashClone(copts)
		st = cs
	})
	crashed := func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return st != nil
	}
	w.create()
	for i := 0; !crashed(); i++ {
		if i == 3000 {
			t.Fatalf("seed %d: %d operations without reaching the crash point (mutation %d)", seed, i, k)
		}
		w.step()
	}
	w.fs.OnOp(nil)
	log.add("crash at %v", st.op)
	if err := w.e.Close(); err != nil {
		t.Fatalf("seed %d: close: %v", seed, err)
	}
	res.stats = w.stats

	// Recovery: the crashed origin, and every store file that reopens.
	origin, err := st.clone.OpenFile("origin", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("seed %d: recovery: open origin: %v", seed, err)
	}
	img := make([]byte, cfg.size)
	if _, err := origin.ReadAt(img, 0); err != nil {
		t.Fatalf("seed %d: recovery: read origin: %v", seed, err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var ends []dirtyEnd
	found := map[*dirtyRec]bool{}
	for _, name := range st.clone.Names() {
		if name == "origin" {
			continue
		}
		f, err := st.clone.OpenFile(name, os.O_RDWR, 0)
		if err != nil {
			t.Fatalf("seed %d: recovery: open %s: %v", seed, name, err)
		}
		s, err := e.Reopen(w.ctx, f, ReopenOptions{OriginID: dirtyOriginID})
		log.add("recovery: reopen %s err=%v", name, err)
		if err != nil {
			f.Close()
			res.refused++
			continue
		}
		res.reopened++
		info := s.Info()
		r := w.uuid[info.UUID]
		cr := st.recs[r]
		switch {
		case r == nil || !cr.attempted:
			t.Fatalf("seed %d: recovery: %s reopened as %s, which no create before the crash made", seed, name, info.UUID)
		case !r.persistent:
			t.Fatalf("seed %d: recovery: transient %s reopened", seed, name)
		case !info.Valid && r.maxSize == 0:
			t.Fatalf("seed %d: recovery: %s reopened invalid: %s", seed, name, info.Reason)
		case info.Bookmark && !cr.bookmarkIssued:
			t.Fatalf("seed %d: recovery: %s reopened as a bookmark, never asked for", seed, name)
		case !info.Bookmark && cr.bookmark:
			t.Fatalf("seed %d: recovery: %s lost its bookmark flag", seed, name)
		}
		found[r] = true
		d := dirtyEnd{r: r, s: s, valid: info.Valid, bookmark: info.Bookmark, img: r.frozen, upper: cr.issued, lower: cr.done}
		if d.valid && !d.bookmark {
			d.img = make([]byte, cfg.size)
			if err := s.ReadAt(w.ctx, d.img, 0); err != nil {
				t.Fatalf("seed %d: recovery: read %s: %v", seed, name, err)
			}
			if !bytes.Equal(d.img, r.frozen) {
				t.Fatalf("seed %d: recovery: %s differs from its image at %d", seed, name, firstDiff(d.img, r.frozen))
			}
		}
		if d.valid {
			res.tracked++
			if len(s.Bases()) > 0 {
				res.withBases++
			}
		}
		ends = append(ends, d)
	}
	for r, cr := range st.recs {
		if cr.created && !cr.clearIssued && r.persistent && !found[r] {
			t.Fatalf("seed %d: recovery: %s (%s), created and not cleared before the crash, did not reopen", seed, r.name, r.uuid)
		}
	}
	rc := rand.New(rand.NewPCG(seed, 0xc4a7))
	if err := dirtyCheckEngine(w.ctx, &res.stats, rc, e, img, ends); err != nil {
		t.Fatalf("seed %d: recovery after a crash at %v: %v", seed, st.op, err)
	}
	return res
}

// TestChangedCrash crashes random workloads (writes, trims, write-zeroes,
// creates of mixed cluster sizes, clears, bookmarks, clean restarts) at
// random mutating operations and checks, after reopening every store that
// opens, that every advertised pair is exact or absent: Bases and Tracked
// list what they should, any two images differ only in clusters reported
// changed (the origin as the crash left it included), and nothing is
// reported changed that no request touched; changes between two snapshots
// are exact, and the origin's include every request that completed before
// the crash. DIRTY_CRASHES=N checks N crash points; -seed or DIRTY_SEED
// replays one.
func TestChangedCrash(t *testing.T) {
	want := 100
	if testing.Short() {
		want = 30
	}
	if n := dirtyEnvInt(t, "DIRTY_CRASHES"); n != 0 {
		want = int(n)
	}
	seeds := dirtySeeds(t, want, 0xc7a500)
	var total dirtyCrashResult
	for _, seed := range seeds {
		r := rand.New(rand.NewPCG(seed, 13))
		k := 1 + r.Int64N(300)
		res := runDirtyCrash(t, seed, k)
		if t.Failed() {
			return
		}
		total.stats.add(res.stats)
		total.reopened += res.reopened
		total.refused += res.refused
		total.withBases += res.withBases
		total.tracked += res.tracked
	}
	t.Logf("%d crash points: %d stores reopened (%d refused: transient or never complete), %d tracked, %d with bases; %v",
		len(seeds), total.reopened, total.refused, total.tracked, total.withBases, total.stats)
	if !dirtyReplay(t) && (total.stats.pairs == 0 || total.stats.originPairs == 0) {
		t.Errorf("no pair was checked after a crash")
	}
}
