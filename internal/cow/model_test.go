package cow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

var seedFlag = flag.Uint64("seed", 0, "replay the randomized engine tests with this seed (0: the default seeds)")

// seeds returns the seeds a randomized test runs: -seed alone, or n seeds
// derived from base.
func seeds(n int, base uint64) []uint64 {
	if *seedFlag != 0 {
		return []uint64{*seedFlag}
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = base + uint64(i)*0x9e3779b97f4a7c15
	}
	return out
}

// opLog records a randomized run's operations so that a failure can be
// read back; it is written to a file when the test fails.
type opLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *opLog) add(format string, args ...any) {
	l.mu.Lock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

// keep writes the log next to the test binary's temp dir and reports where.
func (l *opLog) keep(t testing.TB, seed uint64) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	name := filepath.Join(os.TempDir(), fmt.Sprintf("%s-seed-%d.log", strings.ReplaceAll(t.Name(), "/", "_"), seed))
	if err := os.WriteFile(name, []byte(strings.Join(l.lines, "\n")+"\n"), 0o644); err != nil {
		t.Logf("cannot keep op log: %v", err)
	}
	tail := l.lines[max(0, len(l.lines)-30):]
	t.Logf("seed %d (replay: go test -run '%s' -seed %d); op log kept in %s; last ops:\n%s",
		seed, t.Name(), seed, name, strings.Join(tail, "\n"))
}

// rangeLock serialises overlapping requests of the model test, so the
// model applies them in the engine's order; requests that do not overlap
// (but may share clusters) run concurrently.
type rangeLock struct {
	mu   sync.Mutex
	cond sync.Cond
	held [][2]int64
}

func (r *rangeLock) lock(off, n int64) {
	r.mu.Lock()
	if r.cond.L == nil {
		r.cond.L = &r.mu
	}
	for r.overlaps(off, n) {
		r.cond.Wait()
	}
	r.held = append(r.held, [2]int64{off, n})
	r.mu.Unlock()
}

func (r *rangeLock) overlaps(off, n int64) bool {
	for _, h := range r.held {
		if off < h[0]+h[1] && h[0] < off+n {
			return true
		}
	}
	return false
}

func (r *rangeLock) unlock(off, n int64) {
	r.mu.Lock()
	for i, h := range r.held {
		if h == [2]int64{off, n} {
			r.held = append(r.held[:i], r.held[i+1:]...)
			break
		}
	}
	r.cond.Broadcast()
	r.mu.Unlock()
}

// modelSnap is a live snapshot and the origin's image at its create
// instant.
type modelSnap struct {
	s      *Snapshot
	frozen []byte
	name   string
}

// modelConfig parameterises one randomized run.
type modelConfig struct {
	size        int64
	clusterSize int
	cacheBytes  int64
	transient   func(*rand.Rand) bool
	workers     int
	ops         int // per worker
	maxSnaps    int
	realStore   bool
	// held: first writes under persistent snapshots are held (held.go)
	// whatever the store's sync costs, within heldBytes (0: the log's 1
	// MiB); otherwise writes are never held.
	held      bool
	heldBytes int64
	// failStores: store syncs fail now and then; the snapshot turns
	// invalid (its reads must say so) and the origin loses nothing.
	failStores bool
}

// runModel runs one seeded randomized workload against the engine and a
// model (the origin bytes, and a frozen copy per snapshot).
func runModel(t *testing.T, seed uint64, cfg modelConfig) (cacheWaits int64) {
	t.Helper()
	log := &opLog{}
	failed := true
	defer func() {
		if failed || t.Failed() {
			log.keep(t, seed)
		}
	}()
	rng := rand.New(rand.NewPCG(seed, 1))
	mem := vfstest.NewMemFS()
	origin := mustOpen(t, mem, "origin")
	var fs vfs.FS = mem
	if cfg.failStores {
		faults := vfstest.NewFaultFS(mem)
		fr := rand.New(rand.NewPCG(seed, 2))
		var frMu sync.Mutex
		faults.Inject(vfstest.Rule{Kind: vfstest.OpSync, Times: -1, Pred: func(vfstest.Op) bool {
			frMu.Lock()
			defer frMu.Unlock()
			return fr.IntN(40) == 0
		}})
		fs = faults
	}
	model := make([]byte, cfg.size)
	fillRandom(rng, model)
	if _, err := origin.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.held {
		l := useHeldLog(t, e, MinHeldLogSize)
		defer l.Close()
		if cfg.heldBytes > 0 {
			e.held.budget = cfg.heldBytes // below the log's size: backpressure sooner
		}
	}
	if !cfg.realStore {
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	}
	ctx := context.Background()

	var (
		createMu sync.RWMutex // workers share it per request; create takes it alone
		rl       rangeLock
		snapMu   sync.Mutex
		snaps    []*modelSnap
		nextSnap int
		errs     firstError
		waitsMu  sync.Mutex
	)
	fail := errs.set
	stopped := func() bool { return errs.get() != nil }
	create := func(r *rand.Rand) {
		snapMu.Lock()
		n := len(snaps)
		name := fmt.Sprintf("s%d", nextSnap)
		nextSnap++
		snapMu.Unlock()
		if n >= cfg.maxSnaps {
			return
		}
		transient := cfg.transient(r)
		cs := cfg.clusterSize
		if cs == 0 {
			cs = []int{4 << 10, 8 << 10, 16 << 10}[r.IntN(3)]
		}
		createMu.Lock()
		st := mustOpen(t, fs, name)
		s, err := e.Create(ctx, st, SnapshotOptions{Name: name, ClusterSize: cs, Transient: transient, CacheBytes: cfg.cacheBytes, OriginID: "model"})
		frozen := bytes.Clone(model)
		createMu.Unlock()
		log.add("create %s cs=%d transient=%v err=%v", name, cs, transient, err)
		if err != nil && cfg.failStores {
			return // its store's sync failed: no snapshot
		}
		if err != nil {
			fail(fmt.Errorf("create %s: %w", name, err))
			return
		}
		snapMu.Lock()
		snaps = append(snaps, &modelSnap{s: s, frozen: frozen, name: name})
		snapMu.Unlock()
	}
	clearOne := func(r *rand.Rand) {
		snapMu.Lock()
		if len(snaps) == 0 {
			snapMu.Unlock()
			return
		}
		i := r.IntN(len(snaps))
		ms := snaps[i]
		snaps = append(snaps[:i], snaps[i+1:]...)
		snapMu.Unlock()
		verifySnap(ctx, ms, cfg.failStores, fail)
		waitsMu.Lock()
		cacheWaits += ms.s.Info().Stats.CacheFullWaits
		waitsMu.Unlock()
		err := e.Clear(ms.name)
		log.add("clear %s err=%v", ms.name, err)
		if err != nil && !cfg.failStores { // closing a failing store may fail
			fail(fmt.Errorf("clear %s: %w", ms.name, err))
		}
	}
	pickSnap := func(r *rand.Rand) *modelSnap {
		snapMu.Lock()
		defer snapMu.Unlock()
		if len(snaps) == 0 {
			return nil
		}
		return snaps[r.IntN(len(snaps))]
	}
	randRange := func(r *rand.Rand) (int64, int64) {
		maxLen := int64(3 * 16 << 10)
		n := 1 + r.Int64N(maxLen)
		switch r.IntN(20) {
		case 0, 1, 2, 3, 4:
			n = 1 + r.Int64N(600) // small, unaligned
		case 5:
			n = 1 + r.Int64N(160<<10) // larger than the smallest caches
		}
		n = min(n, cfg.size)
		return r.Int64N(cfg.size - n + 1), n
	}

	create(rng)
	var wg sync.WaitGroup
	for w := range cfg.workers {
		r := rand.New(rand.NewPCG(seed, uint64(w)+100))
		wg.Go(func() {
			buf := make([]byte, 160<<10)
			for i := 0; i < cfg.ops && !stopped(); i++ {
				switch k := r.IntN(100); {
				case k < 45: // write
					off, n := randRange(r)
					p := buf[:n]
					fillRandom(r, p)
					createMu.RLock()
					rl.lock(off, n)
					err := e.WriteAt(ctx, p, off, r.IntN(10) == 0)
					if err == nil {
						copy(model[off:], p)
					}
					rl.unlock(off, n)
					createMu.RUnlock()
					log.add("w%d write off=%d n=%d err=%v", w, off, n, err)
					if err != nil {
						fail(fmt.Errorf("write: %w", err))
					}
				case k < 52, k < 58: // trim or zero
					off, n := randRange(r)
					trim := k < 52
					createMu.RLock()
					rl.lock(off, n)
					var err error
					if trim {
						err = e.Trim(ctx, off, n, false)
					} else {
						err = e.Zero(ctx, off, n, false)
					}
					if err == nil {
						clear(model[off : off+n])
					}
					rl.unlock(off, n)
					createMu.RUnlock()
					log.add("w%d trim=%v off=%d n=%d err=%v", w, trim, off, n, err)
					if err != nil {
						fail(fmt.Errorf("trim/zero: %w", err))
					}
				case k < 62:
					err := e.Flush(ctx)
					log.add("w%d flush err=%v", w, err)
					if err != nil {
						fail(fmt.Errorf("flush: %w", err))
					}
				case k < 75: // origin read: sees every acknowledged write, held ones too
					off, n := randRange(r)
					p := buf[:n]
					rl.lock(off, n)
					err := e.ReadAt(ctx, p, off)
					var diff int
					if err == nil && !bytes.Equal(p, model[off:off+n]) {
						diff = firstDiff(p, model[off:off+n])
						err = fmt.Errorf("differs from the acknowledged writes at +%d", diff)
					}
					rl.unlock(off, n)
					log.add("w%d origin read off=%d n=%d err=%v", w, off, n, err)
					if err != nil {
						fail(fmt.Errorf("origin read off=%d n=%d: %w", off, n, err))
					}
				case k < 97: // snapshot read
					ms := pickSnap(r)
					if ms == nil {
						continue
					}
					off, n := randRange(r)
					p := buf[:n]
					err := ms.s.ReadAt(ctx, p, off)
					log.add("w%d read %s off=%d n=%d err=%v", w, ms.name, off, n, err)
					if errors.Is(err, ErrCleared) || cfg.failStores && errors.Is(err, ErrInvalid) {
						continue
					}
					if err != nil {
						fail(fmt.Errorf("read %s: %w", ms.name, err))
					} else if !bytes.Equal(p, ms.frozen[off:off+n]) {
						fail(fmt.Errorf("read %s off=%d n=%d: differs from the reference at +%d",
							ms.name, off, n, firstDiff(p, ms.frozen[off:off+n])))
					}
				case k < 99:
					create(r)
				default:
					clearOne(r)
				}
			}
		})
	}
	wg.Wait()
	if errs.get() == nil {
		snapMu.Lock()
		for _, ms := range snaps {
			verifySnap(ctx, ms, cfg.failStores, fail)
			info := ms.s.Info()
			if !info.Valid && !cfg.failStores {
				fail(fmt.Errorf("%s invalid: %s", ms.name, info.Reason))
			}
			cacheWaits += info.Stats.CacheFullWaits
		}
		snapMu.Unlock()
		got := make([]byte, cfg.size)
		if err := e.ReadAt(ctx, got, 0); err != nil {
			fail(err)
		} else if !bytes.Equal(got, model) {
			fail(fmt.Errorf("origin differs from the model at %d", firstDiff(got, model)))
		}
	}
	if err := e.Close(); err != nil && !cfg.failStores {
		fail(fmt.Errorf("close: %w", err))
	}
	if errs.get() != nil {
		t.Errorf("seed %d: %v", seed, errs.get())
		return cacheWaits
	}
	failed = false
	return cacheWaits
}

// verifySnap compares a whole snapshot with its reference; one that says
// it is invalid passes if mayFail.
func verifySnap(ctx context.Context, ms *modelSnap, mayFail bool, fail func(error)) {
	got := make([]byte, len(ms.frozen))
	err := ms.s.ReadAt(ctx, got, 0)
	if mayFail && errors.Is(err, ErrInvalid) {
		return
	}
	if err != nil {
		fail(fmt.Errorf("verify %s: %w", ms.name, err))
		return
	}
	if !bytes.Equal(got, ms.frozen) {
		fail(fmt.Errorf("verify %s: differs from the reference at %d", ms.name, firstDiff(got, ms.frozen)))
	}
}

// wantImage reads len(buf) bytes at offset 0 through readAt into buf and
// reports where they first differ from want; fatal stops the test there.
func wantImage(t testing.TB, ctx context.Context, readAt func(context.Context, []byte, int64) error,
	buf, want []byte, what string, fatal bool) {
	t.Helper()
	if err := readAt(ctx, buf, 0); err != nil {
		t.Fatalf("read %s: %v", what, err)
	}
	if !bytes.Equal(buf, want) {
		report := t.Errorf
		if fatal {
			report = t.Fatalf
		}
		report("%s differs at %d", what, firstDiff(buf, want))
	}
}

// firstError keeps the first error the goroutines of a test report.
type firstError struct {
	mu  sync.Mutex
	err error
}

func (f *firstError) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
}

func (f *firstError) get() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// fillRandom fills p from a ChaCha8 stream seeded by r: one call per
// buffer, which keeps the race detector's cost per byte low.
func fillRandom(r *rand.Rand, p []byte) {
	var seed [32]byte
	for i := 0; i < 32; i += 8 {
		binary.LittleEndian.PutUint64(seed[i:], r.Uint64())
	}
	rand.NewChaCha8(seed).Read(p)
}

func mustOpen(t testing.TB, fs vfs.FS, name string) vfs.File {
	t.Helper()
	f, err := fs.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestModel(t *testing.T) {
	n, ops := 12, 400
	if testing.Short() {
		n, ops = 6, 200
	}
	mixed := func(r *rand.Rand) bool { return r.IntN(2) == 0 }
	configs := []struct {
		name string
		cfg  modelConfig
	}{
		{"persistent", modelConfig{size: 256<<10 + 1234, cacheBytes: 1, transient: func(*rand.Rand) bool { return false }}},
		{"transient", modelConfig{size: 256<<10 + 1234, cacheBytes: 1, transient: func(*rand.Rand) bool { return true }}},
		{"mixed", modelConfig{size: 512<<10 + 512, cacheBytes: 64 << 10, transient: mixed}},
		// Held writes: a tiny cache and a budget of a few writes, so
		// that held writes, their backpressure and writes waiting behind
		// them all happen; then a store failing with writes held.
		{"held", modelConfig{size: 256<<10 + 1234, cacheBytes: 1, held: true, heldBytes: 128 << 10, transient: func(*rand.Rand) bool { return false }}},
		{"held-mixed", modelConfig{size: 512<<10 + 512, cacheBytes: 64 << 10, held: true, transient: mixed}},
		{"held-failing", modelConfig{size: 512<<10 + 512, cacheBytes: 64 << 10, held: true, failStores: true, transient: mixed}},
	}
	var tinyCacheWaits int64
	defer func() {
		// The smallest caches must have made writers wait (persistent
		// backpressure alone: TestRequestLargerThanCache).
		if !t.Failed() && *seedFlag == 0 && tinyCacheWaits == 0 {
			t.Errorf("no cache-full waits: backpressure was not exercised")
		}
	}()
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			var waits int64
			for _, seed := range seeds(n, 1) {
				cfg := c.cfg
				cfg.workers, cfg.ops, cfg.maxSnaps = 4, ops, 3
				cfg.realStore = true
				waits += runModel(t, seed, cfg)
				if t.Failed() {
					return
				}
			}
			t.Logf("%d cache-full waits", waits)
			if c.cfg.cacheBytes == 1 {
				tinyCacheWaits += waits
			}
		})
	}
}
