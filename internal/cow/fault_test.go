package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestStoreFaults injects ENOSPC and EIO into one snapshot's store (writes
// or syncs, once or for good), or gives it a size limit it will hit, while
// workers modify the origin. That snapshot must become invalid with a
// reason and read as EIO; no origin request may fail; the other snapshot
// and the origin must be exact.
func TestStoreFaults(t *testing.T) {
	n := 60
	if testing.Short() {
		n = 15
	}
	invalidated, reopened := 0, 0
	for _, seed := range seeds(n, 77) {
		inv, re := runFault(t, seed)
		if t.Failed() {
			return
		}
		if inv {
			invalidated++
		}
		if re {
			reopened++
		}
	}
	t.Logf("%d of %d runs invalidated the faulty snapshot; %d reopened as invalid", invalidated, n, reopened)
	if *seedFlag == 0 && invalidated < n/2 {
		t.Errorf("only %d of %d runs invalidated the snapshot: the faults do not bite", invalidated, n)
	}
}

// runFault runs one case; it reports whether the faulty snapshot became
// invalid and whether its store was reopened and found invalid.
func runFault(t *testing.T, seed uint64) (invalidated, reopenedInvalid bool) {
	t.Helper()
	ctx := context.Background()
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.keep(t, seed)
		}
	}()
	rng := rand.New(rand.NewPCG(seed, 21))
	const size = 128<<10 + 300
	fs := vfstest.NewMemFS()
	ffs := vfstest.NewFaultFS(fs)
	e, _, data := testEngine(t, fs, size, seed, true)
	model := bytes.Clone(data)
	transient := rng.IntN(3) == 0
	cs := []int{4 << 10, 8 << 10}[rng.IntN(2)]

	full := rng.IntN(5) == 0
	var bad *Snapshot
	createBad := func() {
		f, err := ffs.OpenFile("bad", os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		opts := SnapshotOptions{Name: "bad", ClusterSize: cs, Transient: transient, OriginID: "o", CacheBytes: 1}
		if !full {
			if bad, err = e.Create(ctx, f, opts); err != nil {
				t.Fatal(err)
			}
			return
		}
		// The smallest limit the store accepts: room for a few clusters.
		for opts.MaxSize = 16 << 10; ; opts.MaxSize += int64(cs) {
			if bad, err = e.Create(ctx, f, opts); err == nil {
				log.add("store limit %d", opts.MaxSize)
				return
			}
			if opts.MaxSize > 64<<20 {
				t.Fatalf("no MaxSize accepted: %v", err)
			}
		}
	}
	var good *Snapshot
	createGood := func() {
		var err error
		good, err = e.Create(ctx, mustOpen(t, fs, "good"), SnapshotOptions{Name: "good", ClusterSize: cs, Transient: rng.IntN(2) == 0, OriginID: "o"})
		if err != nil {
			t.Fatal(err)
		}
	}
	if rng.IntN(2) == 0 {
		createBad()
		createGood()
	} else {
		createGood()
		createBad()
	}
	rule := vfstest.Rule{
		Kind:  []vfstest.OpKind{vfstest.OpWrite, vfstest.OpSync}[rng.IntN(2)],
		Name:  "bad",
		Nth:   1 + rng.Int64N(12),
		Times: []int{0, -1}[rng.IntN(2)],
		Err:   []syscall.Errno{syscall.ENOSPC, syscall.EIO}[rng.IntN(2)],
	}
	if transient && rule.Kind == vfstest.OpSync {
		rule.Kind = vfstest.OpWrite // transient stores do not sync
	}
	if !full {
		ffs.Inject(rule)
	}
	log.add("transient=%v cs=%d full=%v rule=%+v", transient, cs, full, rule)

	var rl rangeLock
	var wg sync.WaitGroup
	for w := range 3 {
		r := rand.New(rand.NewPCG(seed, uint64(w)+40))
		wg.Go(func() {
			p := make([]byte, 3*cs)
			for range 60 {
				n := 1 + r.Int64N(int64(len(p)))
				off := r.Int64N(size - n + 1)
				kind := r.IntN(10)
				rl.lock(off, n)
				var err error
				switch {
				case kind < 7:
					fillRandom(r, p[:n])
					err = e.WriteAt(ctx, p[:n], off, r.IntN(6) == 0)
				case kind < 9:
					clear(p[:n])
					err = e.Zero(ctx, off, n, false)
				default:
					clear(p[:n])
					err = e.Trim(ctx, off, n, false)
				}
				if err == nil {
					copy(model[off:], p[:n])
				}
				rl.unlock(off, n)
				log.add("w%d op%d off=%d n=%d err=%v", w, kind, off, n, err)
				if err != nil {
					t.Errorf("origin request failed: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := e.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	// Transient snapshots commit behind the requests' backs: let the
	// writers finish before judging.
	for _, s := range []*Snapshot{good, bad} {
		s.commits.waitDurable(s.commits.validSeq.Load())
	}

	img := make([]byte, size)
	if err := e.ReadAt(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img, model) {
		t.Fatalf("origin differs from the model at %d", firstDiff(img, model))
	}
	if info := good.Info(); !info.Valid {
		t.Fatalf("good snapshot invalid: %s", info.Reason)
	}
	wantImage(t, ctx, good.ReadAt, img, data, "good snapshot", true)
	info := bad.Info()
	fired := ffs.Injected() > 0 || full
	log.add("bad: valid=%v reason=%q injected=%d copied=%d", info.Valid, info.Reason, ffs.Injected(), info.ClustersCopied)
	switch {
	case !info.Valid:
		if info.Reason == "" {
			t.Fatalf("invalid without a reason")
		}
		err := bad.ReadAt(ctx, img[:10], 0)
		if !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrInvalid) {
			t.Fatalf("read of the invalid snapshot: %v, want EIO", err)
		}
	case fired:
		// A fault that fired must have invalidated the snapshot (a
		// limit is always hit: the workload copies far more).
		t.Fatalf("a store fault fired (%d) but the snapshot is valid", ffs.Injected())
	default:
		wantImage(t, ctx, bad.ReadAt, img, data, "unfaulted snapshot", true)
	}
	if err := e.Close(); err != nil {
		log.add("close: %v", err)
	}

	// A persistent store whose invalidation could be recorded (the fault
	// was one-off, or hit syncs only) must never reopen as valid.
	if !transient && !info.Valid && (full || rule.Times == 0 || rule.Kind == vfstest.OpSync) {
		origin, err := fs.OpenFile("origin", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		e2, err := NewEngine(origin, EngineOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer e2.Close()
		f, err := fs.OpenFile("bad", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		s, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "o"})
		if err != nil {
			log.add("reopen bad: %v", err)
			t.Logf("seed %d: reopen of the invalidated store refused: %v", seed, err)
			f.Close()
			return true, false
		}
		ri := s.Info()
		log.add("reopen bad: valid=%v reason=%q", ri.Valid, ri.Reason)
		if ri.Valid || ri.Reason == "" {
			t.Fatalf("invalidated store reopened valid=%v reason=%q", ri.Valid, ri.Reason)
		}
		if err := s.ReadAt(ctx, img[:10], 0); !errors.Is(err, syscall.EIO) {
			t.Fatalf("read of the reopened invalid snapshot: %v", err)
		}
		return true, true
	}
	return !info.Valid, false
}
