package cow

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Geometry of TestChangedMemory1TiB: a 1 TiB origin at 64 KiB clusters
// (2^24 clusters), four bases and a snapshot that records them. Base i
// holds the clusters j*dirtyMemStride + i, j < dirtyMemEntries, committed
// in order; the snapshot was "created" when each held half of them.
const (
	dirtyMemOrigin  = int64(1) << 40
	dirtyMemCluster = 64 << 10
	dirtyMemBases   = 4
	dirtyMemStride  = 256
	dirtyMemEntries = (1 << 24) / dirtyMemStride
	dirtyMemAtS     = dirtyMemEntries / 2
)

// dirtyMemStore builds a persistent store of the 1 TiB origin on a
// metaOnlyFile (data discarded) and returns how to reopen it.
func dirtyMemStore(t testing.TB, dir, name string, id uuid.UUID, bases []backstore.Base, clusters func(yield func(uint32))) (path string, dataStart, size int64) {
	t.Helper()
	path = filepath.Join(dir, name)
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	mf := &metaOnlyFile{File: f}
	st, err := backstore.Create(mf, backstore.Options{
		Name: name, ClusterSize: dirtyMemCluster, OriginSize: dirtyMemOrigin, OriginID: "big", Persistent: true,
		UUID: id, Bases: bases,
	})
	if err != nil {
		t.Fatal(err)
	}
	dataStart = st.Header().DataStart
	mf.mu.Lock()
	mf.limit = dataStart
	mf.mu.Unlock()
	zero := make([]byte, dirtyMemCluster)
	batch := make([]backstore.Cluster, 0, 8192)
	flush := func() {
		if len(batch) > 0 {
			if err := st.Commit(batch); err != nil {
				t.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	clusters(func(c uint32) {
		batch = append(batch, backstore.Cluster{Index: c, Data: zero})
		if len(batch) == cap(batch) {
			flush()
		}
	})
	flush()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	return path, dataStart, mf.size
}

// TestChangedMemory1TiB measures what changed-block answers cost in memory:
// they keep no state per pair and read the stores' existing maps, so asking
// a snapshot with four bases for its changes (and the origin for its
// changes since each base) over a large range, and listing the bases, must
// leave the heap where it was: at most one bit per cluster per base (2 MiB
// per base at 1 TiB / 64 KiB) is allowed. It also checks the answers
// (chunked at 65,536 clusters per call) against how the stores were built.
// DIRTY_FULL=1 asks over the whole 1 TiB instead of 20 GiB.
func TestChangedMemory1TiB(t *testing.T) {
	if testing.Short() {
		t.Skip("builds five stores of a 1 TiB origin")
	}
	dir := t.TempDir()
	start := time.Now()
	var baseIDs []uuid.UUID
	var recorded []backstore.Base
	type built struct {
		path            string
		dataStart, size int64
	}
	var stores []built
	for i := range dirtyMemBases {
		id := uuid.UUID{0: 0xd1, 1: byte(i), 6: 0x40, 8: 0x80, 15: byte(i + 1)}
		baseIDs = append(baseIDs, id)
		recorded = append(recorded, backstore.Base{UUID: id, Entries: dirtyMemAtS})
		p, ds, sz := dirtyMemStore(t, dir, fmt.Sprintf("b%d", i), id, nil, func(yield func(uint32)) {
			for j := range uint32(dirtyMemEntries) {
				yield(j*dirtyMemStride + uint32(i))
			}
		})
		stores = append(stores, built{p, ds, sz})
	}
	sID := uuid.UUID{0: 0x5e, 6: 0x40, 8: 0x80, 15: 0x99}
	p, ds, sz := dirtyMemStore(t, dir, "s", sID, recorded, func(yield func(uint32)) {
		for j := range uint32(dirtyMemEntries / 4) {
			yield(j*dirtyMemStride*4 + 100)
		}
	})
	stores = append(stores, built{p, ds, sz})
	t.Logf("built %d stores of %d entries in %v", len(stores), dirtyMemEntries, time.Since(start))

	origin, err := vfs.OS{}.OpenFile(filepath.Join(dir, "origin"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer origin.Close()
	if err := origin.Truncate(dirtyMemOrigin); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx := context.Background()
	var s *Snapshot
	for _, b := range stores {
		f, err := vfs.OS{}.OpenFile(b.path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		snap, err := e.Reopen(ctx, &metaOnlyFile{File: f, size: b.size, limit: b.dataStart}, ReopenOptions{OriginID: "big", CacheBytes: 1})
		if err != nil {
			t.Fatal(err)
		}
		s = snap
	}
	if got := s.Bases(); len(got) != dirtyMemBases {
		t.Fatalf("Bases() = %v, want %d", got, dirtyMemBases)
	}

	// The range: unaligned, across the point where the snapshot was taken
	// (entry dirtyMemAtS of each base), over several calls.
	off := int64(dirtyMemAtS*dirtyMemStride-3*maxChangedClusters)*dirtyMemCluster + 12345
	length := int64(5*maxChangedClusters)*dirtyMemCluster + 777
	if os.Getenv("DIRTY_FULL") != "" {
		off, length = 0, dirtyMemOrigin
	}
	g := geometryOf(dirtyMemOrigin, dirtyMemCluster)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start = time.Now()

	bases := s.Bases()
	calls, maxRuns, changedTotal := 0, 0, 0
	// walk asks call for [off, off+length) and checks every cluster
	// against want, without keeping the answers.
	walk := func(what string, call func(off, n int64) ([]ChangedRun, error), want func(c uint32) bool) {
		t.Helper()
		for pos, end := off, off+length; pos < end; {
			runs, err := call(pos, end-pos)
			if err != nil {
				t.Fatalf("%s at %d: %v", what, pos, err)
			}
			calls++
			maxRuns = max(maxRuns, len(runs))
			first := pos
			for _, r := range runs {
				if r.Length <= 0 || pos+r.Length > end {
					t.Fatalf("%s: run of %d bytes at %d (end %d)", what, r.Length, pos, end)
				}
				a, b := g.span(pos, r.Length)
				for c := a; c <= b; c++ {
					if want(c) != r.Changed {
						t.Fatalf("%s: cluster %d reported changed=%v, want %v", what, c, r.Changed, want(c))
					}
					if r.Changed {
						changedTotal++
					}
				}
				pos += r.Length
			}
			if a, b := g.span(first, pos-first); b-a+1 > maxChangedClusters {
				t.Fatalf("%s: one answer covers %d clusters, more than %d", what, b-a+1, maxChangedClusters)
			}
			if pos < end && pos%dirtyMemCluster != 0 {
				t.Fatalf("%s: a short answer ends at %d, inside a cluster", what, pos)
			}
		}
	}
	for i, b := range bases {
		if b.UUID != baseIDs[i].String() || b.Granularity != dirtyMemCluster {
			t.Fatalf("base %d: %+v, want UUID %s", i, b, baseIDs[i])
		}
		mine := func(c uint32) bool { return c%dirtyMemStride == uint32(i) }
		walk(fmt.Sprintf("s.Changed(%s)", b.Name), func(o, n int64) ([]ChangedRun, error) { return s.Changed(ctx, b.Name, o, n) },
			func(c uint32) bool { return mine(c) && c/dirtyMemStride < dirtyMemAtS })
		walk(fmt.Sprintf("ChangedSince(%s)", b.Name), func(o, n int64) ([]ChangedRun, error) { return e.ChangedSince(ctx, b.Name, o, n) }, mine)
	}
	_ = e.Tracked()
	took := time.Since(start)

	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	garbage := after.TotalAlloc - before.TotalAlloc
	limit := int64(dirtyMemBases) * int64(g.count) / 8
	clusters := (length + dirtyMemCluster - 1) / dirtyMemCluster
	t.Logf("1 TiB origin, 64 KiB clusters, %d bases of %d entries: %d clusters asked per base and end (%d calls, at most %d runs per answer, %d changed) in %v: heap %+d bytes after (limit %d: one bit per cluster per base), %d bytes allocated and dropped (%.2f per cluster asked), heap in use %.1f MiB",
		len(bases), dirtyMemEntries, clusters, calls, maxRuns, changedTotal, took, heap, limit, garbage,
		float64(garbage)/float64(2*int64(len(bases))*clusters), float64(after.HeapAlloc)/(1<<20))
	if heap > limit {
		t.Errorf("changed-block answers left %d bytes on the heap, more than one bit per cluster per base (%d)", heap, limit)
	}
	runtime.KeepAlive(e)
}
