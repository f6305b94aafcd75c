package cow

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// crashSnap is a snapshot of a crash workload and what recovery must show.
type crashSnap struct {
	name       string
	frozen     []byte
	persistent bool
	created    atomic.Bool // Create returned
	cleared    atomic.Bool // Clear was called: recovery need not find it
}

// crashWorker is one writer of a crash workload. It owns a half of the
// origin; durable is its half as of its last completed Flush, dirty marks
// bytes written since (which a crash may or may not keep).
type crashWorker struct {
	lo, hi  int64
	mu      sync.Mutex // guards durable and dirty against the crash hook
	cur     []byte     // the half as acknowledged
	durable []byte
	dirty   []byte // 1: written since the last flush
}

// crashState is captured by the hook at the crash instant.
type crashState struct {
	clone   *vfstest.MemFS
	durable [][]byte
	dirty   [][]byte
	snaps   []*crashSnap
	created []bool
	cleared []bool
}

// runCrash runs one workload with a crash at mutating operation k and checks
// the recovered state; it reports whether the crash point was reached.
func runCrash(t *testing.T, seed uint64, k int64) bool {
	t.Helper()
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.add("crash point: mutation %d", k)
			log.keep(t, seed)
		}
	}()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 11))
	const size = 96<<10 + 1000
	cs := []int{4 << 10, 8 << 10, 16 << 10}[rng.IntN(3)]
	fs := vfstest.NewMemFS()
	origin := mustOpen(t, fs, "origin")
	init := make([]byte, size)
	fillRandom(rng, init)
	if _, err := origin.WriteAt(init, 0); err != nil {
		t.Fatal(err)
	}
	if err := origin.Sync(); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	workers := []*crashWorker{{lo: 0, hi: size / 2}, {lo: size / 2, hi: size}}
	for _, w := range workers {
		w.cur = bytes.Clone(init[w.lo:w.hi])
		w.durable = bytes.Clone(w.cur)
		w.dirty = make([]byte, w.hi-w.lo)
	}
	var (
		createMu sync.RWMutex
		snapMu   sync.Mutex
		snaps    []*crashSnap
		state    *crashState
		stateMu  sync.Mutex
		crashed  atomic.Bool
	)
	copts := vfstest.CrashOptions{Rand: rand.New(rand.NewPCG(seed, 12)), KeepProbability: rng.Float64(), TornWrites: rng.IntN(2) == 0}
	fs.OnOp(func(op vfstest.Op) {
		if op.Seq != k {
			return
		}
		// What must survive is read before the clone is taken, what
		// may have changed after it: crashed stops the workers from
		// advancing durable (and from clearing dirty) from here on; the
		// durable images and the created flags are read before the
		// clone, so they name only what completed before it; the dirty
		// marks and the cleared flags after it, so they cover everything
		// issued before it.
		log.add("crash at %v", op)
		crashed.Store(true)
		st := &crashState{}
		for _, w := range workers {
			w.mu.Lock()
			st.durable = append(st.durable, bytes.Clone(w.durable))
			w.mu.Unlock()
		}
		snapMu.Lock()
		st.snaps = append(st.snaps, snaps...)
		for _, s := range snaps {
			st.created = append(st.created, s.created.Load())
		}
		snapMu.Unlock()
		st.clone = fs.CrashClone(copts)
		for _, w := range workers {
			w.mu.Lock()
			st.dirty = append(st.dirty, bytes.Clone(w.dirty))
			w.mu.Unlock()
		}
		for _, s := range st.snaps {
			st.cleared = append(st.cleared, s.cleared.Load())
		}
		stateMu.Lock()
		state = st
		stateMu.Unlock()
	})

	ones := bytes.Repeat([]byte{1}, 3*cs)
	var wg sync.WaitGroup
	for wi, w := range workers {
		r := rand.New(rand.NewPCG(seed, uint64(wi)+20))
		wg.Go(func() {
			p := make([]byte, 3*cs)
			for i := 0; i < 40; i++ {
				switch op := r.IntN(100); {
				case op < 8 && wi == 0: // create
					snapMu.Lock()
					n := len(snaps)
					snapMu.Unlock()
					if n >= 3 {
						continue
					}
					name := fmt.Sprintf("s%d", i)
					cs := &crashSnap{name: name, persistent: r.IntN(4) != 0}
					createMu.Lock()
					cs.frozen = make([]byte, size)
					for _, w := range workers {
						copy(cs.frozen[w.lo:], w.cur)
					}
					snapMu.Lock()
					snaps = append(snaps, cs)
					snapMu.Unlock()
					st := mustOpen(t, fs, name)
					_, err := e.Create(ctx, st, SnapshotOptions{Name: name, ClusterSize: len(p) / 3, Transient: !cs.persistent, OriginID: "crash"})
					createMu.Unlock()
					log.add("create %s persistent=%v err=%v", name, cs.persistent, err)
					if err != nil {
						t.Errorf("create: %v", err)
						return
					}
					cs.created.Store(true)
				case op < 11 && wi == 0: // clear
					snapMu.Lock()
					var victim *crashSnap
					for _, s := range snaps {
						if !s.cleared.Load() && s.created.Load() {
							victim = s
							break
						}
					}
					snapMu.Unlock()
					if victim == nil {
						continue
					}
					victim.cleared.Store(true)
					err := e.Clear(victim.name)
					log.add("clear %s err=%v", victim.name, err)
					if err != nil {
						t.Errorf("clear: %v", err)
						return
					}
					if err := fs.Remove(victim.name); err != nil {
						t.Errorf("remove: %v", err)
					}
				case op < 25: // flush
					w.mu.Lock()
					before := bytes.Clone(w.cur)
					w.mu.Unlock()
					err := e.Flush(ctx)
					log.add("w%d flush err=%v", wi, err)
					if err != nil {
						t.Errorf("flush: %v", err)
						return
					}
					// Everything acknowledged before the flush began is durable.
					// This worker issued nothing during its flush, so
					// before is also its current half.
					w.mu.Lock()
					if !crashed.Load() {
						copy(w.durable, before)
						clear(w.dirty)
					}
					w.mu.Unlock()
				default: // write, zero, trim
					n := 1 + r.Int64N(int64(len(p)))
					n = min(n, w.hi-w.lo)
					off := w.lo + r.Int64N(w.hi-w.lo-n+1)
					kind := r.IntN(10)
					fua := r.IntN(8) == 0
					createMu.RLock()
					w.mu.Lock()
					copy(w.dirty[off-w.lo:off-w.lo+n], ones)
					w.mu.Unlock()
					var err error
					switch {
					case kind < 7:
						fillRandom(r, p[:n])
						err = e.WriteAt(ctx, p[:n], off, fua)
					case kind < 9:
						clear(p[:n])
						err = e.Zero(ctx, off, n, fua)
					default:
						clear(p[:n])
						err = e.Trim(ctx, off, n, fua)
					}
					w.mu.Lock()
					copy(w.cur[off-w.lo:], p[:n])
					if fua && !crashed.Load() {
						copy(w.durable[off-w.lo:], p[:n])
					}
					w.mu.Unlock()
					createMu.RUnlock()
					log.add("w%d op%d off=%d n=%d fua=%v err=%v", wi, kind, off, n, fua, err)
					if err != nil {
						t.Errorf("write: %v", err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if err := e.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	stateMu.Lock()
	st := state
	stateMu.Unlock()
	if st == nil {
		return false
	}
	log.add("crash state: %d snapshots", len(st.snaps))
	checkRecovery(t, ctx, st, workers, size)
	return true
}

// checkRecovery reopens what a crash left and compares it with the model.
func checkRecovery(t *testing.T, ctx context.Context, st *crashState, workers []*crashWorker, size int64) {
	t.Helper()
	origin, err := st.clone.OpenFile("origin", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("recovery: open origin: %v", err)
	}
	got := make([]byte, size)
	if _, err := origin.ReadAt(got, 0); err != nil {
		t.Fatalf("recovery: read origin: %v", err)
	}
	for wi, w := range workers {
		// Compare each run of bytes not written since the last flush.
		dirty, durable, img := st.dirty[wi], st.durable[wi], got[w.lo:w.hi]
		for a := 0; a < len(dirty); {
			if dirty[a] != 0 {
				i := bytes.IndexByte(dirty[a:], 0)
				if i < 0 {
					break
				}
				a += i
				continue
			}
			b := len(dirty)
			if i := bytes.IndexByte(dirty[a:], 1); i >= 0 {
				b = a + i
			}
			if !bytes.Equal(img[a:b], durable[a:b]) {
				j := a + firstDiff(img[a:b], durable[a:b])
				t.Fatalf("recovery: origin byte %d lost a flushed write (got %x, want %x)",
					w.lo+int64(j), img[j:min(b, j+8)], durable[j:min(b, j+8)])
			}
			a = b
		}
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for i, cs := range st.snaps {
		if st.cleared[i] {
			continue
		}
		f, err := st.clone.OpenFile(cs.name, os.O_RDWR, 0)
		if err != nil {
			if st.created[i] {
				t.Fatalf("recovery: store of %s missing: %v", cs.name, err)
			}
			continue
		}
		s, err := e.Reopen(ctx, f, ReopenOptions{OriginID: "crash"})
		if !cs.persistent {
			if err == nil {
				t.Fatalf("recovery: transient %s reopened", cs.name)
			}
			f.Close()
			continue
		}
		if err != nil {
			f.Close()
			if st.created[i] {
				t.Fatalf("recovery: reopen %s: %v", cs.name, err)
			}
			continue
		}
		if info := s.Info(); !info.Valid {
			t.Fatalf("recovery: %s invalid: %s", cs.name, info.Reason)
		}
		img := make([]byte, size)
		if err := s.ReadAt(ctx, img, 0); err != nil {
			t.Fatalf("recovery: read %s: %v", cs.name, err)
		}
		if !bytes.Equal(img, cs.frozen) {
			t.Fatalf("recovery: %s differs from its reference at %d", cs.name, firstDiff(img, cs.frozen))
		}
	}
}

var crashesFlag = flag.Int("crashes", 0, "crash points TestCrash checks (0: 1,000, or 100 with -short)")

// TestCrash crashes random workloads at random mutating operations (with a
// random part of the unsynced writes kept, possibly torn) and checks that
// every persistent snapshot reopens equal to its reference and that the
// origin holds every flushed write.
func TestCrash(t *testing.T) {
	want := 1000
	if testing.Short() {
		want = 100
	}
	if *crashesFlag > 0 {
		want = *crashesFlag
	}
	if *seedFlag != 0 {
		want = 1
	}
	base := uint64(0x5eed)
	if *seedFlag != 0 {
		base = *seedFlag
	}
	crashes := 0
	for i := uint64(0); crashes < want && i < uint64(want)*4; i++ {
		seed := base + i
		r := rand.New(rand.NewPCG(seed, 13))
		k := 1 + r.Int64N(220)
		if runCrash(t, seed, k) {
			crashes++
		}
		if t.Failed() {
			return
		}
	}
	if crashes < want {
		t.Fatalf("only %d crash points reached", crashes)
	}
	t.Logf("%d crash points checked", crashes)
}
