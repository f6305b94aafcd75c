package backstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// scratchDir is a directory on tmpfs when there is one (the reopen test
// measures the store's code, not a disk), else the test's temp dir.
func scratchDir(t testing.TB) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "backstore-test-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

// buildLargeStore commits n clusters of 512 bytes (in random cluster order,
// batches of 1 to 8192) to a store on a real file and returns its path.
// Each cluster's data starts with its index, so reads can be checked.
func buildLargeStore(t testing.TB, n int) string {
	path := filepath.Join(scratchDir(t), "store")
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Create(f, Options{Name: "big", ClusterSize: 512, OriginSize: int64(n+n/8) * 512, Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(5, 5))
	perm := r.Perm(n + n/8)[:n]
	data := make([]byte, 512*8192)
	for i := 0; i < n; {
		k := min(1+r.IntN(8192), n-i)
		batch := make([]Cluster, k)
		for j := range batch {
			c := uint32(perm[i+j])
			d := data[j*512 : (j+1)*512]
			binary.LittleEndian.PutUint32(d, c)
			batch[j] = Cluster{Index: c, Data: d}
		}
		if err := s.Commit(batch); err != nil {
			t.Fatal(err)
		}
		i += k
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func openPath(t testing.TB, path string) *Store {
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestReopenMillion: reopening a store holding 1,000,000 clusters must
// take under 2 s (100,000 under -short).
func TestReopenMillion(t *testing.T) {
	n := 1_000_000
	if testing.Short() {
		n = 100_000
	}
	path := buildLargeStore(t, n)
	start := time.Now()
	s := openPath(t, path)
	elapsed := time.Since(start)
	defer s.Close()
	t.Logf("reopen of a store with %d clusters: %v (race detector: %v)", n, elapsed, raceEnabled)
	if s.CopiedCount() != n {
		t.Fatalf("reopened store holds %d clusters, want %d", s.CopiedCount(), n)
	}
	limit := 2 * time.Second
	if raceEnabled {
		limit = 20 * time.Second
	}
	if elapsed > limit {
		t.Errorf("reopen took %v, limit %v", elapsed, limit)
	}
	// Spot-check the map against the data.
	p := make([]byte, 4)
	seen := 0
	s.ForEachCopied(func(c uint32) {
		if seen++; seen%997 != 0 {
			return
		}
		if ok, err := s.ReadCluster(c, p, 0); !ok || err != nil || binary.LittleEndian.Uint32(p) != c {
			t.Fatalf("cluster %d: %v %v %x", c, ok, err, p)
		}
	})
}

// BenchmarkReopenMillion measures Open of a store with 1,000,000 clusters.
func BenchmarkReopenMillion(b *testing.B) {
	path := buildLargeStore(b, 1_000_000)
	for b.Loop() {
		s := openPath(b, path)
		s.Close()
	}
}

// TestIndexMemory measures the cluster → slot map of an origin of 2^24
// clusters (1 TiB at 64 KiB) with 10% of the clusters copied in random
// order, as the engine's steady state would hold it.
func TestIndexMemory(t *testing.T) {
	const clusters = 1 << 24
	copied := clusters / 10
	r := rand.New(rand.NewPCG(1, 1))
	// A random 10% (each cluster with probability 1/10), in random order.
	order := make([]uint32, 0, copied+copied/10)
	for c := uint32(0); c < clusters; c++ {
		if r.Uint32()%10 == 0 {
			order = append(order, c)
		}
	}
	r.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	copied = len(order)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	idx := newIndex(clusters)
	for slot, c := range order {
		idx.insert(c, uint32(slot))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	used := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("index of %d clusters with %d copied: %.1f MiB (%.2f bytes per copied cluster)",
		clusters, copied, float64(used)/(1<<20), float64(used)/float64(copied))
	if used > 40<<20 {
		t.Errorf("index uses %d bytes, budget 40 MiB", used)
	}
	for i := 0; i < 1000; i++ {
		slot := r.IntN(copied)
		if got, ok := idx.lookup(order[slot]); !ok || got != uint32(slot) {
			t.Fatalf("lookup(%d) = %d, %v; want %d", order[slot], got, ok, slot)
		}
	}
	runtime.KeepAlive(order)
	runtime.KeepAlive(&idx)
}

// TestIndexModel checks the index against a map.
func TestIndexModel(t *testing.T) {
	r := rand.New(rand.NewPCG(2, 2))
	const clusters = 5000
	idx := newIndex(clusters)
	model := map[uint32]uint32{}
	for i := 0; i < 20000; i++ {
		c := uint32(r.IntN(clusters))
		_, had := model[c]
		if ok := idx.insert(c, uint32(i)); ok == had {
			t.Fatalf("insert(%d): %v, model had it: %v", c, ok, had)
		}
		if !had {
			model[c] = uint32(i)
		}
		q := uint32(r.IntN(clusters))
		got, ok := idx.lookup(q)
		want, wok := model[q]
		if ok != wok || got != want {
			t.Fatalf("lookup(%d) = %d, %v; model %d, %v", q, got, ok, want, wok)
		}
	}
	if idx.n != len(model) {
		t.Fatalf("n = %d, model %d", idx.n, len(model))
	}
}

// TestConcurrentReads runs readers against a committing writer (for
// -race): a reader that finds a cluster must read its full, right data.
func TestConcurrentReads(t *testing.T) {
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "s"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	const n = 1500
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 3))
			p := make([]byte, 512)
			for {
				select {
				case <-done:
					return
				default:
				}
				c := uint32(r.IntN(n))
				ok, err := s.ReadCluster(c, p, 0)
				if err != nil {
					t.Error(err)
					return
				}
				if ok && string(p) != string(clusterData(8, c, 512)) {
					t.Errorf("cluster %d: wrong data while committing", c)
					return
				}
				if g == 0 {
					s.ForEachCopied(func(uint32) {})
					_ = s.CopiedCount() + int(s.Bytes())
				}
			}
		}()
	}
	r := rand.New(rand.NewPCG(9, 9))
	perm := r.Perm(n)
	for i := 0; i < n; {
		k := min(1+r.IntN(30), n-i)
		var cs []uint32
		for _, c := range perm[i : i+k] {
			cs = append(cs, uint32(c))
		}
		err := s.Commit(makeBatch(s, 8, cs...))
		if errors.Is(err, ErrInvalid) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		i += k
		if i > n/2 && i-k <= n/2 {
			wg.Add(1)
			go func() { // races with the next commits, as the engine's error path may
				defer wg.Done()
				if err := s.Invalidate("concurrent invalidation"); err != nil {
					t.Error(err)
				}
			}()
		}
	}
	close(done)
	wg.Wait()
	if s.Header().State != StateInvalid {
		t.Error("store still valid")
	}
}

// BenchmarkCommit measures Commit of persistent and transient batches of
// 64 KiB clusters on tmpfs (the store's own cost) and on the test's temp
// directory (a real disk's fdatasync, when it is one).
func BenchmarkCommit(b *testing.B) {
	for _, where := range []string{"shm", "tmp"} {
		for _, persistent := range []bool{true, false} {
			for _, n := range []int{1, 4, 32} {
				name := fmt.Sprintf("%s/persistent=%v/batch=%d", where, persistent, n)
				b.Run(name, func(b *testing.B) {
					dir := b.TempDir()
					if where == "shm" {
						dir = scratchDir(b)
					}
					f, err := vfs.OS{}.OpenFile(filepath.Join(dir, "store"), os.O_RDWR|os.O_CREATE, 0o600)
					if err != nil {
						b.Fatal(err)
					}
					const cs = 64 << 10
					s, err := Create(f, Options{ClusterSize: cs, OriginSize: 1 << 40, Persistent: persistent})
					if err != nil {
						b.Fatal(err)
					}
					defer s.Close()
					data := make([]byte, cs)
					batch := make([]Cluster, n)
					next := uint32(0)
					b.SetBytes(int64(n * cs))
					for b.Loop() {
						for i := range batch {
							batch[i] = Cluster{Index: next, Data: data}
							next++
						}
						if err := s.Commit(batch); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}
