package cow

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
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
	csize      int
	created    atomic.Bool // Create returned
	cleared    atomic.Bool // Clear was called: recovery need not find it
}

// crashWorker is one writer of a crash workload. It owns a half of the
// origin; durable is its half as of its last completed Flush, dirty marks
// bytes written since, and since holds those writes: a crash may keep any
// of them, so a dirty byte must hold its durable value or one of theirs.
type crashWorker struct {
	lo, hi  int64
	mu      sync.Mutex // guards durable, dirty and since against the crash hook
	cur     []byte     // the half as acknowledged
	durable []byte
	dirty   []byte // 1: written since the last flush
	since   []crashWrite
}

// crashWrite is a write, zero or trim issued since the last flush: its
// offset in the worker's half and the bytes it puts there.
type crashWrite struct {
	off  int64
	data []byte
}

// crashState is captured by the hook at the crash instant.
type crashState struct {
	clone   *vfstest.MemFS
	durable [][]byte
	dirty   [][]byte
	since   [][]crashWrite
	snaps   []*crashSnap
	created []bool
	cleared []bool
}

// crashClusterSizes are the cluster sizes a crash workload draws from, one
// per snapshot, so that snapshots of different sizes (several groups, each
// reading the origin for itself) live in one engine.
var crashClusterSizes = []int{4 << 10, 8 << 10, 16 << 10}

// crashMaxOps bounds each worker's operations: a workload goes on past its
// 40 operations until it has reached its crash point, which takes at most a
// few hundred (every operation of the second worker mutates the file system
// at least once, and k is at most 220).
const crashMaxOps = 2000

// runCrash runs one workload with a crash at its k-th mutating operation and
// checks the recovered state. The workload goes on until it has reached the
// crash point; it fails the test if it cannot. Odd seeds hold first writes
// (held.go) whatever the store's sync costs. It returns the most cluster
// sizes that live snapshots had at once, and how many writes were held.
func runCrash(t *testing.T, seed uint64, k int64) (groups int, held int64) {
	t.Helper()
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.add("crash point: mutation %d of the workload", k)
			log.keep(t, seed)
		}
	}()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 11))
	const size = 96<<10 + 1000
	maxCS := crashClusterSizes[len(crashClusterSizes)-1]
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
	if seed%2 == 1 {
		l := useHeldLog(t, e, MinHeldLogSize)
		defer l.Close()
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
	// k counts the workload's mutations: the setup's (the origin's
	// initial write and sync) come before the hook and would never reach it.
	crashAt := fs.MutationCount() + k
	fs.OnOp(func(op vfstest.Op) {
		if op.Seq != crashAt {
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
			st.since = append(st.since, slices.Clone(w.since))
			w.mu.Unlock()
		}
		for _, s := range st.snaps {
			st.cleared = append(st.cleared, s.cleared.Load())
		}
		stateMu.Lock()
		state = st
		stateMu.Unlock()
	})

	ones := bytes.Repeat([]byte{1}, 3*maxCS)
	var wg sync.WaitGroup
	for wi, w := range workers {
		r := rand.New(rand.NewPCG(seed, uint64(wi)+20))
		wg.Go(func() {
			p := make([]byte, 3*maxCS)
			for i := 0; i < 40 || !crashed.Load(); i++ {
				if i == crashMaxOps {
					t.Errorf("seed %d: worker %d did %d operations without reaching the crash point (mutation %d of the workload)",
						seed, wi, i, k)
					return
				}
				switch op := r.IntN(100); {
				case op < 8 && wi == 0: // create
					snapMu.Lock()
					n := len(snaps)
					snapMu.Unlock()
					if n >= 3 {
						continue
					}
					name := fmt.Sprintf("s%d", i)
					cs := &crashSnap{name: name, persistent: r.IntN(4) != 0, csize: crashClusterSizes[r.IntN(len(crashClusterSizes))]}
					createMu.Lock()
					cs.frozen = make([]byte, size)
					for _, w := range workers {
						copy(cs.frozen[w.lo:], w.cur)
					}
					snapMu.Lock()
					snaps = append(snaps, cs)
					snapMu.Unlock()
					st := mustOpen(t, fs, name)
					_, err := e.Create(ctx, st, SnapshotOptions{Name: name, ClusterSize: cs.csize, Transient: !cs.persistent, OriginID: "crash"})
					createMu.Unlock()
					log.add("create %s persistent=%v cluster=%d err=%v", name, cs.persistent, cs.csize, err)
					if err != nil {
						t.Errorf("create: %v", err)
						return
					}
					cs.created.Store(true)
					live := map[int]bool{}
					snapMu.Lock()
					for _, s := range snaps {
						if s.created.Load() && !s.cleared.Load() {
							live[s.csize] = true
						}
					}
					snapMu.Unlock()
					groups = max(groups, len(live))
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
						w.since = nil
					}
					w.mu.Unlock()
				default: // write, zero, trim
					// Up to three clusters of a size drawn per request:
					// small requests and ones spanning the largest clusters.
					n := 1 + r.Int64N(3*int64(crashClusterSizes[r.IntN(len(crashClusterSizes))]))
					n = min(n, w.hi-w.lo)
					off := w.lo + r.Int64N(w.hi-w.lo-n+1)
					kind := r.IntN(10)
					fua := r.IntN(8) == 0
					if kind < 7 {
						fillRandom(r, p[:n])
					} else {
						clear(p[:n])
					}
					createMu.RLock()
					w.mu.Lock()
					copy(w.dirty[off-w.lo:off-w.lo+n], ones)
					w.since = append(w.since, crashWrite{off - w.lo, bytes.Clone(p[:n])})
					w.mu.Unlock()
					var err error
					switch {
					case kind < 7:
						err = e.WriteAt(ctx, p[:n], off, fua)
					case kind < 9:
						err = e.Zero(ctx, off, n, fua)
					default:
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
	held = e.Held().Total
	if err := e.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	stateMu.Lock()
	st := state
	stateMu.Unlock()
	if t.Failed() {
		return groups, held
	}
	if st == nil {
		t.Fatalf("seed %d: the workload ended before its crash point (mutation %d)", seed, k)
	}
	log.add("crash state: %d snapshots", len(st.snaps))
	checkRecovery(t, ctx, st, workers, size)
	return groups, held
}

// writtenSince reports whether v is byte j's flushed value or the value a
// write issued since the flush put there.
func writtenSince(v, flushed byte, since []crashWrite, j int64) bool {
	if v == flushed {
		return true
	}
	for _, w := range since {
		if j >= w.off && j < w.off+int64(len(w.data)) && w.data[j-w.off] == v {
			return true
		}
	}
	return false
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
		// Compare each run of bytes not written since the last flush; a
		// byte written since holds its flushed value or one of those
		// writes', never anything else (older, or no write's).
		dirty, durable, img := st.dirty[wi], st.durable[wi], got[w.lo:w.hi]
		for a := 0; a < len(dirty); {
			if dirty[a] != 0 {
				if !writtenSince(img[a], durable[a], st.since[wi], int64(a)) {
					t.Fatalf("recovery: origin byte %d holds %#x: neither its flushed value %#x nor that of a write issued since",
						w.lo+int64(a), img[a], durable[a])
				}
				a++
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
// origin holds every flushed write. Each run draws a cluster size per
// snapshot, so that snapshots of different sizes share an engine, and
// reaches its crash point: every seed is a crash point checked.
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
	mixed := 0 // runs in which snapshots of several cluster sizes lived at once
	var held int64
	for i := uint64(0); i < uint64(want); i++ {
		seed := base + i
		r := rand.New(rand.NewPCG(seed, 13))
		k := 1 + r.Int64N(220)
		groups, h := runCrash(t, seed, k)
		if groups > 1 {
			mixed++
		}
		held += h
		if t.Failed() {
			return
		}
	}
	t.Logf("%d crash points checked; %d runs had snapshots of several cluster sizes at once; %d writes held", want, mixed, held)
	if *seedFlag == 0 && mixed == 0 {
		t.Errorf("no run had snapshots of several cluster sizes at once")
	}
	if *seedFlag == 0 && held == 0 {
		t.Errorf("no write was held")
	}
}
