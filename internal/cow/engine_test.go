package cow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

func TestGeometry(t *testing.T) {
	for _, tc := range []struct {
		size       int64
		req        int
		wantCS     int
		wantCount  uint32
		wantLast   int
		wantErrStr string
	}{
		{size: 1 << 20, req: 0, wantCS: 64 << 10, wantCount: 16, wantLast: 64 << 10},
		{size: 1<<20 + 1, req: 0, wantCS: 64 << 10, wantCount: 17, wantLast: 1},
		{size: 100, req: 4096, wantCS: 4096, wantCount: 1, wantLast: 100},
		{size: 1 << 40, req: 0, wantCS: 64 << 10, wantCount: 1 << 24, wantLast: 64 << 10},
		{size: 1<<40 + 1, req: 0, wantCS: 128 << 10, wantCount: 1<<23 + 1, wantLast: 1},
		{size: 1 << 40, req: 4096, wantCS: 64 << 10, wantCount: 1 << 24, wantLast: 64 << 10},
		{size: 1 << 20, req: 3000, wantErrStr: "power of two"},
		{size: 1 << 20, req: 2048, wantErrStr: "power of two"},
		{size: 1 << 20, req: 2 << 20, wantErrStr: "power of two"},
		{size: 0, req: 0, wantErrStr: "origin size"},
		{size: 1<<44 + 1, req: 0, wantErrStr: "above"},
	} {
		g, err := newGeometry(tc.size, tc.req)
		if tc.wantErrStr != "" {
			if err == nil || !errors.Is(err, syscall.EINVAL) {
				t.Errorf("newGeometry(%d, %d) = %v, want EINVAL error", tc.size, tc.req, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("newGeometry(%d, %d): %v", tc.size, tc.req, err)
		}
		if g.csize != tc.wantCS || g.count != tc.wantCount || g.lastLen != tc.wantLast {
			t.Errorf("newGeometry(%d, %d) = cs %d count %d last %d, want %d %d %d",
				tc.size, tc.req, g.csize, g.count, g.lastLen, tc.wantCS, tc.wantCount, tc.wantLast)
		}
		if g.clusterLen(g.count-1) != tc.wantLast || int64(g.count-1)*int64(g.csize)+int64(g.lastLen) != tc.size {
			t.Errorf("geometry of %d does not add up", tc.size)
		}
	}
}

func TestCacheSlots(t *testing.T) {
	for _, tc := range []struct {
		cs     int
		budget int64
		want   int
	}{
		{4 << 10, 0, 32}, {8 << 10, 1, 32}, {16 << 10, 0, 8}, {64 << 10, 0, 8},
		{128 << 10, 0, 4}, {1 << 20, 0, 4}, {64 << 10, 8 << 20, 128}, {4 << 10, 8 << 20, 2048},
	} {
		if got := cacheSlots(tc.cs, tc.budget); got != tc.want {
			t.Errorf("cacheSlots(%d, %d) = %d, want %d", tc.cs, tc.budget, got, tc.want)
		}
	}
}

// testEngine builds an engine on a MemFS origin of size bytes of random
// data; the stores are memStores unless real is set.
func testEngine(t testing.TB, fs vfs.FS, size int64, seed uint64, real bool) (*Engine, vfs.File, []byte) {
	t.Helper()
	origin := mustOpen(t, fs, "origin")
	data := make([]byte, size)
	fillRandom(rand.New(rand.NewPCG(seed, 7)), data)
	if _, err := origin.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := origin.Sync(); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !real {
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	}
	return e, origin, data
}

// countingFile counts origin reads, to check that a cluster is read once
// for all snapshots.
type countingFile struct {
	vfs.File
	reads atomic.Int64
}

func (c *countingFile) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.File.ReadAt(p, off)
}

func TestSharedCopyReadsOriginOnce(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	base := mustOpen(t, fs, "origin")
	if _, err := base.WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	cf := &countingFile{File: base}
	e, err := NewEngine(cf, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	var snaps []*Snapshot
	for i, tr := range []bool{false, true, false} {
		s, err := e.Create(ctx, nil, SnapshotOptions{Name: fmt.Sprint("s", i), Transient: tr})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s)
	}
	cf.reads.Store(0)
	// Two clusters, three snapshots: two origin reads.
	if err := e.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 64<<10-2048, false); err != nil {
		t.Fatal(err)
	}
	if got := cf.reads.Load(); got != 2 {
		t.Errorf("origin reads for 2 clusters and 3 snapshots = %d, want 2", got)
	}
	if err := e.WriteAt(ctx, bytes.Repeat([]byte{2}, 100), 64<<10, false); err != nil {
		t.Fatal(err)
	}
	if got := cf.reads.Load(); got != 2 {
		t.Errorf("a second write to copied clusters read the origin (%d reads)", got)
	}
	for _, s := range snaps {
		p := make([]byte, 1<<20)
		if err := s.ReadAt(ctx, p, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, make([]byte, 1<<20)) {
			t.Errorf("%s: not the frozen image", s.Name())
		}
		info := s.Info()
		if info.Stats.ClustersCopied != 2 || info.ClustersCopied != 2 || info.Stats.CowCalls != 2 {
			t.Errorf("%s: stats %+v copied %d", s.Name(), info.Stats, info.ClustersCopied)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCreateInstantIsACut checks the create instant under concurrent
// writes: each worker writes its own 512-byte blocks in sequence, and every
// snapshot must hold, per worker, exactly its first k writes for some k,
// with k at least the writes acknowledged before Create was called and at
// most those started before it returned.
func TestCreateInstantIsACut(t *testing.T) {
	const (
		workers = 4
		block   = 3072 // blocks straddle 4 KiB clusters: a torn cut shows
		size    = 3072 * 96
		nblocks = size / block
	)
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	origin := mustOpen(t, fs, "origin")
	if _, err := origin.WriteAt(make([]byte, size), 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }

	type cutSnap struct {
		s              *Snapshot
		acked, started [workers]int64
	}
	var (
		history [workers][]int // history[w][i-1] = block of write i
		acked   [workers]atomic.Int64
		started [workers]atomic.Int64
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 3))
			p := make([]byte, block)
			for i := int64(1); !stop.Load(); i++ {
				b := r.IntN(nblocks/workers)*workers + w
				for j := 0; j < block; j += 16 {
					binary.LittleEndian.PutUint64(p[j:], uint64(w))
					binary.LittleEndian.PutUint64(p[j+8:], uint64(i))
				}
				history[w] = append(history[w], b)
				started[w].Store(i)
				if err := e.WriteAt(ctx, p, int64(b)*block, false); err != nil {
					t.Error(err)
					return
				}
				acked[w].Store(i)
			}
		})
	}
	var cuts []cutSnap
	for i := range 6 {
		time.Sleep(2 * time.Millisecond)
		var c cutSnap
		for w := range workers {
			c.acked[w] = acked[w].Load()
		}
		s, err := e.Create(ctx, nil, SnapshotOptions{Name: fmt.Sprint("cut", i), ClusterSize: 4096, Transient: i%2 == 1})
		if err != nil {
			t.Fatal(err)
		}
		for w := range workers {
			c.started[w] = started[w].Load()
		}
		c.s = s
		cuts = append(cuts, c)
	}
	time.Sleep(2 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	for _, c := range cuts {
		img := make([]byte, size)
		if err := c.s.ReadAt(ctx, img, 0); err != nil {
			t.Fatal(err)
		}
		for w := range workers {
			var k int64
			for b := w; b < nblocks; b += workers {
				blk := img[b*block : (b+1)*block]
				if ww, i := binary.LittleEndian.Uint64(blk), int64(binary.LittleEndian.Uint64(blk[8:])); i != 0 && int(ww) == w {
					k = max(k, i)
				}
			}
			if k < c.acked[w] || k > c.started[w] {
				t.Errorf("%s worker %d: cut at write %d, want within [%d, %d]", c.s.Name(), w, k, c.acked[w], c.started[w])
			}
			want := make(map[int]int64)
			for i := int64(1); i <= k; i++ {
				want[history[w][i-1]] = i
			}
			for b := w; b < nblocks; b += workers {
				blk := img[b*block : (b+1)*block]
				got := int64(binary.LittleEndian.Uint64(blk[8:]))
				for j := 16; j < block; j += 16 {
					if g := int64(binary.LittleEndian.Uint64(blk[j+8:])); g != got {
						t.Errorf("%s worker %d block %d: torn: writes %d and %d", c.s.Name(), w, b, got, g)
						break
					}
				}
				if got != want[b] {
					t.Errorf("%s worker %d block %d: holds write %d, want %d (cut %d)", c.s.Name(), w, b, got, want[b], k)
					break
				}
			}
		}
		if info := c.s.Info(); info.CreatePause <= 0 || info.CreatePause > time.Second {
			t.Errorf("%s: create pause %v", c.s.Name(), info.CreatePause)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestInvalidation: a failing commit makes that snapshot invalid with a
// reason; origin requests go on, other snapshots are unaffected.
func TestInvalidation(t *testing.T) {
	for _, transient := range []bool{false, true} {
		t.Run(fmt.Sprint("transient=", transient), func(t *testing.T) {
			ctx := context.Background()
			const size = 512 << 10
			fs := vfstest.NewMemFS()
			e, _, data := testEngine(t, fs, size, 1, false)
			var stores []*memStore
			e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
				m := newMemStore(o)
				stores = append(stores, m)
				return m, nil
			}
			bad, err := e.Create(ctx, nil, SnapshotOptions{Name: "bad", ClusterSize: 4096, Transient: transient, CacheBytes: 1})
			if err != nil {
				t.Fatal(err)
			}
			stores[0].mu.Lock()
			stores[0].fail = func(int) error {
				// Called with the store's lock held: once 8 clusters
				// are in, whatever the batching, the store is full.
				if len(stores[0].data) >= 8 {
					return fmt.Errorf("store: %w", syscall.ENOSPC)
				}
				return nil
			}
			stores[0].mu.Unlock()
			good, err := e.Create(ctx, nil, SnapshotOptions{Name: "good", ClusterSize: 4096, Transient: transient})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(data)
			var wg sync.WaitGroup
			var mu sync.Mutex
			for w := range 4 {
				wg.Go(func() {
					p := make([]byte, 4096)
					for i := range 50 {
						off := int64((i*4+w)*4096) % size
						fillRandom(rand.New(rand.NewPCG(uint64(w), uint64(i))), p)
						if err := e.WriteAt(ctx, p, off, false); err != nil {
							t.Errorf("origin write failed: %v", err)
							return
						}
						mu.Lock()
						copy(model[off:], p)
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			if err := e.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			// Transient commits run behind the requests: let them finish.
			bad.commits.waitDurable(bad.commits.validSeq.Load())
			info := bad.Info()
			if info.Valid || info.Reason == "" {
				t.Fatalf("bad snapshot: valid %v reason %q", info.Valid, info.Reason)
			}
			// Persistent: origin writes that skipped the copy were
			// issued only after the invalidation was recorded. Transient:
			// the writer records it asynchronously.
			if !transient {
				if h := stores[0].header(); h.Valid || h.Reason == "" {
					t.Errorf("store header not invalidated when the origin moved on: %+v", h)
				}
			}
			for i := 0; i < 100 && stores[0].header().Valid; i++ {
				time.Sleep(time.Millisecond)
			}
			if h := stores[0].header(); h.Valid || h.Reason == "" {
				t.Errorf("store header not invalidated: %+v", h)
			}
			p := make([]byte, 4096)
			err = bad.ReadAt(ctx, p, 0)
			if !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrInvalid) {
				t.Errorf("read of invalid snapshot: %v, want EIO", err)
			}
			img := make([]byte, size)
			wantImage(t, ctx, good.ReadAt, img, data, "good snapshot", false)
			wantImage(t, ctx, e.ReadAt, img, model, "origin", false)
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestRangeAndNames(t *testing.T) {
	ctx := context.Background()
	e, _, _ := testEngine(t, vfstest.NewMemFS(), 64<<10, 1, false)
	if err := e.WriteAt(ctx, make([]byte, 10), 64<<10-5, false); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("write past the end: %v", err)
	}
	if err := e.Zero(ctx, -1, 10, false); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("zero at -1: %v", err)
	}
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Create(ctx, nil, SnapshotOptions{Name: "a"}); !errors.Is(err, ErrExists) {
		t.Errorf("duplicate name: %v", err)
	}
	if _, err := e.Create(ctx, nil, SnapshotOptions{Name: "b", ClusterSize: 5000}); !errors.Is(err, ErrBadOption) {
		t.Errorf("bad cluster size: %v", err)
	}
	if err := s.ReadAt(ctx, make([]byte, 2), 64<<10-1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("snapshot read past the end: %v", err)
	}
	if err := e.Clear("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("clear unknown: %v", err)
	}
	if err := e.Clear("a"); err != nil {
		t.Fatal(err)
	}
	if err := s.ReadAt(ctx, make([]byte, 2), 0); !errors.Is(err, ErrCleared) {
		t.Errorf("read of cleared snapshot: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, make([]byte, 1), 0, false); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
}

// TestGroupCommitSlowStore: with a store whose commits cost a millisecond
// (a disk's sync) and concurrent first writes, commits gather several
// clusters (the writer lingers for the requests it released), and the
// snapshot stays exact.
func TestGroupCommitSlowStore(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	e, _, data := testEngine(t, vfstest.NewMemFS(), size, 5, false)
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
		m := newMemStore(o)
		m.fail = func(int) error { time.Sleep(time.Millisecond); return nil }
		return m, nil
	}
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "slow", ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			for i := w; i < 64; i += 4 {
				if err := e.WriteAt(ctx, p, int64(i)*4096, false); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	img := make([]byte, size)
	wantImage(t, ctx, s.ReadAt, img, data, "snapshot", true)
	st := s.Info().Stats
	t.Logf("%d clusters in %d commits", st.ClustersCopied, st.Syncs)
	if st.ClustersCopied != 64 || st.Syncs >= 64 {
		t.Errorf("%d clusters in %d commits: no group commit", st.ClustersCopied, st.Syncs)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLingerFor: a commit waits for more clusters only after an expensive
// sync, only when more are expected, and never long.
func TestLingerFor(t *testing.T) {
	for _, tc := range []struct {
		sync            time.Duration
		pending, expect int
		want            time.Duration
	}{
		{0, 1, 8, 0},                                   // tmpfs: syncs are free
		{lingerThreshold - 1, 1, 8, 0},                 // a fast device
		{lingerThreshold, 1, 8, lingerThreshold / 2},   // half the sync
		{4 * time.Millisecond, 1, 8, maxLinger},        // never longer than maxLinger
		{4 * time.Millisecond, 8, 8, 0},                // everything expected is there
		{4 * time.Millisecond, 9, 8, 0},                // more than expected
		{4 * time.Millisecond, 1, 1, 0},                // a lone writer
		{4 * time.Millisecond, 0, 0, 0},                // nothing expected
		{time.Millisecond, 3, 4, time.Millisecond / 2}, // a disk
	} {
		if got := lingerFor(tc.sync, tc.pending, tc.expect); got != tc.want {
			t.Errorf("lingerFor(%v, %d, %d) = %v, want %v", tc.sync, tc.pending, tc.expect, got, tc.want)
		}
	}
}

// slowFile delays its writes or its syncs.
type slowFile struct {
	vfs.File
	write, sync time.Duration
}

func (f slowFile) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(f.write)
	return f.File.WriteAt(p, off)
}

func (f slowFile) Sync() error {
	time.Sleep(f.sync)
	return f.File.Sync()
}

// TestCommitReportsSyncTime: the store adapter reports how long a commit's
// sync took, not the whole commit, which is what lingerFor needs (a commit
// that is long because it writes much data must not make the next one wait).
func TestCommitReportsSyncTime(t *testing.T) {
	const slow = 3 * time.Millisecond
	for _, tc := range []struct {
		name        string
		write, sync time.Duration
		slowSync    bool
	}{
		{"slow writes", slow, 0, false},
		{"slow sync", 0, slow, true},
	} {
		fs := vfstest.NewMemFS()
		st, err := createBackstore(slowFile{mustOpen(t, fs, "store"), tc.write, tc.sync}, storeOptions{
			Name: "s", ClusterSize: 4096, OriginSize: 1 << 20, Persistent: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		syncTime, err := st.commit([]storeCluster{{index: 1, data: make([]byte, 4096)}, {index: 2, data: make([]byte, 4096)}})
		if err != nil {
			t.Fatal(err)
		}
		if got := syncTime >= slow; got != tc.slowSync {
			t.Errorf("%s: commit reported a sync of %v", tc.name, syncTime)
		}
		if err := st.close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestReopen: a persistent snapshot survives an engine restart (a clean
// one here; TestCrash covers crashes); Reopen refuses a transient store and
// another origin.
func TestReopen(t *testing.T) {
	ctx := context.Background()
	const size = 200<<10 + 7
	fs := vfstest.NewMemFS()
	e, origin, data := testEngine(t, fs, size, 9, true)
	if _, err := e.Create(ctx, mustOpen(t, fs, "p"), SnapshotOptions{Name: "p", ClusterSize: 8192, OriginID: "o1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Create(ctx, mustOpen(t, fs, "t"), SnapshotOptions{Name: "t", ClusterSize: 8192, Transient: true, OriginID: "o1"}); err != nil {
		t.Fatal(err)
	}
	model := bytes.Clone(data)
	p := make([]byte, 30000)
	for i := range 20 {
		fillRandom(rand.New(rand.NewPCG(uint64(i), 0)), p)
		off := int64(i*9973) % (size - int64(len(p)))
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	if err := e.Zero(ctx, size-100, 100, false); err != nil {
		t.Fatal(err)
	}
	clear(model[size-100:])
	copied := func() int64 { s, _ := e.Snapshot("p"); return s.Info().ClustersCopied }()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	e2, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	f, _ := fs.OpenFile("p", os.O_RDWR, 0)
	if _, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "other"}); !errors.Is(err, ErrOriginMismatch) {
		t.Errorf("reopen with another origin id: %v", err)
	}
	if _, err := f.ReadAt(make([]byte, 1), 0); err != nil {
		t.Errorf("a refused store's file is no longer the caller's: %v", err)
	}
	f, _ = fs.OpenFile("t", os.O_RDWR, 0)
	if _, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "o1"}); err == nil {
		t.Errorf("a transient store reopened")
	}
	f, _ = fs.OpenFile("p", os.O_RDWR, 0)
	s, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "o1"})
	if err != nil {
		t.Fatal(err)
	}
	if info := s.Info(); !info.Valid || !info.Persistent || info.ClustersCopied != copied || info.ClusterSize != 8192 {
		t.Errorf("reopened info %+v, want %d copied", info, copied)
	}
	img := make([]byte, size)
	wantImage(t, ctx, s.ReadAt, img, data, "reopened snapshot", true)
	// Copy-on-write resumes: more writes, the snapshot stays frozen.
	if err := e2.WriteAt(ctx, p, 0, true); err != nil {
		t.Fatal(err)
	}
	wantImage(t, ctx, s.ReadAt, img, data, "snapshot after reopen and more writes", true)
}

// TestRequestLargerThanCache: one request that needs more clusters than
// the cache has slots must not wait forever for itself (persistent mode:
// its own clusters are committed only when someone commits).
func TestRequestLargerThanCache(t *testing.T) {
	for _, transient := range []bool{false, true} {
		ctx := context.Background()
		const size = 1 << 20
		e, _, data := testEngine(t, vfstest.NewMemFS(), size, 3, false)
		// A transient writer drains the cache while the request fills it
		// and may keep up, so the first commit is held until the request
		// found the cache full (bounded: a regression fails below rather
		// than hanging). A persistent request waits for its commits and
		// reaches a full cache by itself.
		var snap atomic.Pointer[Snapshot]
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
			m := newMemStore(o)
			m.fail = func(n int) error {
				for end := time.Now().Add(10 * time.Second); transient && n == 1 && time.Now().Before(end); {
					if s := snap.Load(); s != nil && s.stats.cacheFullWaits.Load() > 0 {
						break
					}
					time.Sleep(time.Millisecond)
				}
				return nil
			}
			return m, nil
		}
		s, err := e.Create(ctx, nil, SnapshotOptions{Name: "small", ClusterSize: 4096, CacheBytes: 1, Transient: transient})
		if err != nil {
			t.Fatal(err)
		}
		snap.Store(s)
		done := make(chan error, 1)
		go func() { done <- e.WriteAt(ctx, make([]byte, 512<<10), 4096, false) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("transient=%v: a write of 128 clusters through a 32-slot cache is stuck", transient)
		}
		img := make([]byte, size)
		wantImage(t, ctx, s.ReadAt, img, data, "snapshot", true)
		if w := s.Info().Stats.CacheFullWaits; w == 0 {
			t.Errorf("transient=%v: no cache-full wait", transient)
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHotPathAllocs: origin writes do not allocate, neither first writes
// (copy-on-write through a warm cache, with a store that does not allocate
// itself) nor writes to copied clusters, nor snapshot reads from the cache.
func TestHotPathAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	ctx := context.Background()
	const size = 64 << 20
	// MemFS allocates on every write; this origin does not.
	e, err := NewEngine(&sliceFile{b: make([]byte, size)}, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for _, transient := range []bool{true, false} {
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return nullStore{o}, nil }
		name := fmt.Sprint("t", transient)
		_, err := e.Create(ctx, nil, SnapshotOptions{Name: name, ClusterSize: 4096, Transient: transient, CacheBytes: 1})
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 4096)
		next := int64(0)
		first := func() {
			if err := e.WriteAt(ctx, p, next*4096, false); err != nil {
				t.Fatal(err)
			}
			next++
		}
		for range 500 { // warm the pools and the slot map
			first()
		}
		if a := testing.AllocsPerRun(1000, first); a > 0.05 {
			t.Errorf("transient=%v: first write: %.2f allocations per write", transient, a)
		}
		again := func() {
			if err := e.WriteAt(ctx, p, 4096, false); err != nil {
				t.Fatal(err)
			}
		}
		if a := testing.AllocsPerRun(1000, again); a > 0 {
			t.Errorf("transient=%v: write to a copied cluster: %.2f allocations", transient, a)
		}
		if err := e.Clear(name); err != nil {
			t.Fatal(err)
		}
	}
}

// sliceFile is an origin in a byte slice that does not allocate.
type sliceFile struct {
	mu sync.RWMutex
	b  []byte
}

func (f *sliceFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return copy(p, f.b[off:]), nil
}

func (f *sliceFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return copy(f.b[off:], p), nil
}

func (f *sliceFile) Sync() error          { return nil }
func (f *sliceFile) Size() (int64, error) { return int64(len(f.b)), nil }
func (f *sliceFile) Truncate(int64) error { return errors.New("fixed size") }
func (f *sliceFile) Close() error         { return nil }

// gateFile blocks origin reads of one offset until released, and counts
// reads.
type gateFile struct {
	vfs.File
	blockOff int64
	entered  chan struct{}
	release  chan struct{}
	reads    atomic.Int64
}

func (g *gateFile) ReadAt(p []byte, off int64) (int, error) {
	g.reads.Add(1)
	if off == g.blockOff {
		g.entered <- struct{}{}
		<-g.release
	}
	return g.File.ReadAt(p, off)
}

// TestSecondWriterWaitsForCopy (cowwait2): while one request copies a
// cluster, another request on that cluster waits for the copy, does not
// read the origin again, and the origin is modified only after the copy.
func TestSecondWriterWaitsForCopy(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	base := mustOpen(t, fs, "origin")
	data := bytes.Repeat([]byte{7}, 64<<10)
	if _, err := base.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	g := &gateFile{File: base, blockOff: 8192, entered: make(chan struct{}), release: make(chan struct{})}
	e, err := NewEngine(g, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: 4096, Transient: true})
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() { first <- e.WriteAt(ctx, []byte{1}, 8192, false) }()
	<-g.entered // the first request is copying cluster 2
	second := make(chan error, 1)
	go func() { second <- e.WriteAt(ctx, []byte{2}, 8193, false) }()
	select {
	case err := <-second:
		t.Fatalf("second write finished (%v) while the cluster was being copied", err)
	case <-time.After(50 * time.Millisecond):
	}
	if got, _ := fs.Contents("origin"); got[8193] != 7 {
		t.Fatalf("origin modified before the copy completed")
	}
	close(g.release)
	for _, ch := range []chan error{first, second} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if n := g.reads.Load(); n != 1 {
		t.Errorf("origin read %d times for one cluster", n)
	}
	img := make([]byte, 64<<10)
	wantImage(t, ctx, s.ReadAt, img, data, "snapshot", true)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestPersistentWaitsForCommit: in persistent mode an origin write is
// issued only after the commit holding its cluster returned; in transient
// mode (fss) only the copy into the cache is waited for.
func TestPersistentWaitsForCommit(t *testing.T) {
	for _, transient := range []bool{false, true} {
		ctx := context.Background()
		fs := vfstest.NewMemFS()
		e, _, data := testEngine(t, fs, 64<<10, 4, false)
		release := make(chan struct{})
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
			m := newMemStore(o)
			m.fail = func(int) error { <-release; return nil }
			return m, nil
		}
		if _, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: 4096, Transient: transient}); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- e.WriteAt(ctx, []byte{^data[100]}, 100, false) }()
		if transient {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("transient: write waits for the store")
			}
		} else {
			select {
			case err := <-done:
				t.Fatalf("persistent: write finished (%v) before its commit returned", err)
			case <-time.After(100 * time.Millisecond):
			}
			if got, _ := fs.Contents("origin"); got[100] != data[100] {
				t.Fatalf("persistent: origin modified before the commit returned")
			}
		}
		close(release)
		if !transient {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestZeroTrimFallback: an origin without Zeroer/Deallocator gets zeros
// written; the snapshot keeps the old contents.
func TestZeroTrimFallback(t *testing.T) {
	ctx := context.Background()
	const size = 1<<20 + 3
	orig := &sliceFile{b: make([]byte, size)}
	fillRandom(rand.New(rand.NewPCG(1, 1)), orig.b)
	data := bytes.Clone(orig.b)
	e, err := NewEngine(orig, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Zero(ctx, 1000, 300<<10, true); err != nil {
		t.Fatal(err)
	}
	if err := e.Trim(ctx, size-(500<<10), 500<<10, false); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[1000 : 1000+300<<10])
	clear(want[size-(500<<10):])
	got := make([]byte, size)
	wantImage(t, ctx, e.ReadAt, got, want, "origin", true)
	wantImage(t, ctx, s.ReadAt, got, data, "snapshot", true)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestOriginReadError (fss: "fs read error"): when copying fails to read
// the origin, the snapshot becomes invalid and the write goes on.
func TestOriginReadError(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	ffs := vfstest.NewFaultFS(fs)
	base := mustOpen(t, fs, "origin")
	if _, err := base.WriteAt(make([]byte, 256<<10), 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(ffs.Wrap("origin", base), EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s"})
	if err != nil {
		t.Fatal(err)
	}
	ffs.Inject(vfstest.Rule{Kind: vfstest.OpRead, Name: "origin", Err: syscall.EIO})
	if err := e.WriteAt(ctx, []byte{1, 2, 3}, 70000, false); err != nil {
		t.Fatalf("origin write failed with the snapshot: %v", err)
	}
	if got, _ := fs.Contents("origin"); got[70000] != 1 {
		t.Fatalf("origin write lost")
	}
	if info := s.Info(); info.Valid || !strings.Contains(info.Reason, "read origin") {
		t.Fatalf("after an origin read error: valid %v reason %q", info.Valid, info.Reason)
	}
	if err := s.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of the invalid snapshot: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestClearRefusesReadsBeforeDropping: Clear drops cached copies without
// committing them, so a read that starts once Clear has begun must fail as
// cleared, never miss the cache and report a copied cluster as missing from
// the store. The writer is held inside a commit so that a copy is still
// cached, uncommitted, while Clear waits for it.
func TestClearRefusesReadsBeforeDropping(t *testing.T) {
	ctx := context.Background()
	const csize = 4096
	fs := vfstest.NewMemFS()
	origin := mustOpen(t, fs, "origin")
	if _, err := origin.WriteAt(make([]byte, 4*csize), 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inCommit, release := make(chan struct{}), make(chan struct{})
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
		m := newMemStore(o)
		m.fail = func(n int) error {
			if n == 1 {
				close(inCommit)
				<-release
			}
			return nil
		}
		return m, nil
	}
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: csize, Transient: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, []byte{1}, 0, false); err != nil { // cluster 0: commit 1, held
		t.Fatal(err)
	}
	<-inCommit
	if err := e.WriteAt(ctx, []byte{1}, csize, false); err != nil { // cluster 1: cached, pending
		t.Fatal(err)
	}
	cleared := make(chan error, 1)
	go func() { cleared <- e.Clear("s") }()
	for stopping := false; !stopping; {
		stopping = s.commits.stopping.Load()
		runtime.Gosched()
	}
	if err := s.ReadAt(ctx, make([]byte, csize), csize); !errors.Is(err, ErrCleared) {
		t.Errorf("read of a snapshot being cleared: %v, want ErrCleared", err)
	}
	close(release)
	if err := <-cleared; err != nil {
		t.Fatal(err)
	}
}

// readCounter counts the bytes read through a vfs.File.
type readCounter struct {
	vfs.File
	n atomic.Int64
}

func (r *readCounter) ReadAt(p []byte, off int64) (int, error) {
	r.n.Add(int64(len(p)))
	return r.File.ReadAt(p, off)
}

// TestSnapshotReadSkipsCopiedClusters: a snapshot read takes copied
// clusters from their copies and reads the origin only for the others, and
// still returns the frozen image where the two alternate.
func TestSnapshotReadSkipsCopiedClusters(t *testing.T) {
	ctx := context.Background()
	const csize, n = 4096, 8
	fs := vfstest.NewMemFS()
	frozen := make([]byte, n*csize)
	for i := range frozen {
		frozen[i] = byte(i / csize)
	}
	f := mustOpen(t, fs, "origin")
	if _, err := f.WriteAt(frozen, 0); err != nil {
		t.Fatal(err)
	}
	origin := &readCounter{File: f}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: csize})
	if err != nil {
		t.Fatal(err)
	}
	// Overwrite clusters 1, 2 and 5 (copied); 0, 3, 4, 6, 7 stay as they were.
	for _, c := range []int64{1, 2, 5} {
		if err := e.WriteAt(ctx, bytes.Repeat([]byte{0xFF}, csize), c*csize, false); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name      string
		off, len  int64
		originLen int64 // bytes the read may take from the origin
	}{
		{"all", 0, n * csize, 5 * csize},
		{"copied only", csize, 2 * csize, 0},
		{"partial clusters at both ends", csize / 2, 5 * csize, csize/2 + 2*csize},
		{"inside one uncopied cluster", 3*csize + 10, 100, 100},
		{"inside one copied cluster", 5*csize + 10, 100, 0},
	} {
		origin.n.Store(0)
		p := make([]byte, tc.len)
		if err := s.ReadAt(ctx, p, tc.off); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !bytes.Equal(p, frozen[tc.off:tc.off+tc.len]) {
			t.Errorf("%s: the snapshot read differs from the frozen image", tc.name)
		}
		if got := origin.n.Load(); got != tc.originLen {
			t.Errorf("%s: read %d bytes from the origin, want %d", tc.name, got, tc.originLen)
		}
	}
}

// hintFile counts the write-behind hints its store gives it.
type hintFile struct {
	vfs.File
	hints atomic.Int64
}

func (h *hintFile) StartWriteback(off, length int64) error {
	h.hints.Add(1)
	return nil
}

// TestStoreWriteBehind: the file under a persistent snapshot's store gets
// the store's write-behind hints through the engine's wrapper; a transient
// one gets none.
func TestStoreWriteBehind(t *testing.T) {
	ctx := context.Background()
	for _, transient := range []bool{false, true} {
		fs := vfstest.NewMemFS()
		e, _, _ := testEngine(t, fs, 1<<20, 1, true)
		store := &hintFile{File: mustOpen(t, fs, "store")}
		if _, err := e.Create(ctx, store, SnapshotOptions{Name: "s", ClusterSize: 4096, Transient: transient}); err != nil {
			t.Fatal(err)
		}
		for off := int64(0); off < 1<<20; off += 64 << 10 {
			if err := e.WriteAt(ctx, make([]byte, 512), off, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		if got := store.hints.Load(); (got > 0) == transient {
			t.Errorf("transient=%v: %d write-behind hints", transient, got)
		}
	}
}
