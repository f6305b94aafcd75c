package cow

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// The origins here live on a MemFS, whose holes are its all-zero 4 KiB
// blocks (vfstest.HoleBlock): a block of zeros is a hole, any other byte
// makes its block data.

const kib = 1 << 10

var extentSeed = flag.Uint64("extent-seed", 0, "seed of TestSnapshotExtentsRace (0: random)")

// sparseOrigin makes a MemFS origin of size bytes, data (0xA5) in the
// given [start, end) ranges and holes elsewhere, and an engine on it with
// in-memory stores.
func sparseOrigin(t testing.TB, size int64, data ...[2]int64) (*Engine, vfs.File) {
	t.Helper()
	origin := mustOpen(t, vfstest.NewMemFS(), "origin")
	if err := origin.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, r := range data {
		if _, err := origin.WriteAt(bytes.Repeat([]byte{0xA5}, int(r[1]-r[0])), r[0]); err != nil {
			t.Fatal(err)
		}
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	return e, origin
}

// runs writes an answer as [start, end, hole] triples from off, for
// comparisons and messages.
func runs(off int64, exts []Extent) [][3]int64 {
	var out [][3]int64
	for _, x := range exts {
		h := int64(0)
		if x.Hole {
			h = 1
		}
		out = append(out, [3]int64{off, off + x.Length, h})
		off += x.Length
	}
	return out
}

// mapAll asks f for the whole of [off, end), as many times as it takes.
func mapAll(t testing.TB, f func(ctx context.Context, off, length int64) ([]Extent, error), off, end int64) []Extent {
	t.Helper()
	var all extentList
	for pos := off; pos < end; {
		exts, err := f(context.Background(), pos, end-pos)
		if err != nil {
			t.Fatalf("extents at %d: %v", pos, err)
		}
		checkShape(t, exts, pos, end-pos)
		for _, x := range exts {
			all.add(x.Length, x.Hole)
			pos += x.Length
		}
	}
	return all
}

// checkShape checks what every answer must be: at most maxExtents runs of
// positive length, neighbours of different kinds, covering at least one
// byte and at most the range.
func checkShape(t testing.TB, exts []Extent, off, length int64) {
	t.Helper()
	var sum int64
	for i, x := range exts {
		if x.Length <= 0 || (i > 0 && exts[i-1].Hole == x.Hole) {
			t.Fatalf("extents at %d+%d: bad run %d in %v", off, length, i, runs(off, exts))
		}
		sum += x.Length
	}
	if len(exts) == 0 || len(exts) > maxExtents || sum > length {
		t.Fatalf("extents at %d+%d: %d runs covering %d", off, length, len(exts), sum)
	}
}

// The layout the table tests use: 256 KiB and 100 bytes, data in
// [16K, 32K), [64K, 68K) and from 160K to the end.
const layoutSize = 256*kib + 100

var layoutData = [][2]int64{{16 * kib, 32 * kib}, {64 * kib, 68 * kib}, {160 * kib, layoutSize}}

func TestEngineExtents(t *testing.T) {
	e, _ := sparseOrigin(t, layoutSize, layoutData...)
	ctx := context.Background()
	for _, tc := range []struct {
		off, length int64
		want        [][3]int64
	}{
		{0, layoutSize, [][3]int64{{0, 16 * kib, 1}, {16 * kib, 32 * kib, 0}, {32 * kib, 64 * kib, 1},
			{64 * kib, 68 * kib, 0}, {68 * kib, 160 * kib, 1}, {160 * kib, layoutSize, 0}}},
		{1000, 20000, [][3]int64{{1000, 16 * kib, 1}, {16 * kib, 21000, 0}}},
		{20 * kib, 1, [][3]int64{{20 * kib, 20*kib + 1, 0}}},
		{100 * kib, 10 * kib, [][3]int64{{100 * kib, 110 * kib, 1}}},
		{layoutSize - 1, 1, [][3]int64{{layoutSize - 1, layoutSize, 0}}},
		{layoutSize, 0, nil},
	} {
		exts, err := e.Extents(ctx, tc.off, tc.length)
		if err != nil {
			t.Fatalf("Extents(%d, %d): %v", tc.off, tc.length, err)
		}
		if got := runs(tc.off, exts); !slices.Equal(got, tc.want) {
			t.Errorf("Extents(%d, %d) = %v, want %v", tc.off, tc.length, got, tc.want)
		}
	}
	for _, r := range [][2]int64{{-1, 10}, {0, layoutSize + 1}, {layoutSize + 1, 0}, {10, -1}} {
		if _, err := e.Extents(ctx, r[0], r[1]); !errors.Is(err, ErrRange) {
			t.Errorf("Extents(%d, %d): %v, want ErrRange", r[0], r[1], err)
		}
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := e.Extents(cancelled, 0, 10); !errors.Is(err, context.Canceled) {
		t.Errorf("Extents with a cancelled context: %v", err)
	}
}

// opaqueFile hides every optional interface of its file.
type opaqueFile struct{ vfs.File }

// An origin that cannot tell holes (a file without vfs.DataSeeker, a block
// device) is all data.
func TestEngineExtentsAllData(t *testing.T) {
	fs := vfstest.NewMemFS()
	if err := fs.CreateDevice("dev", layoutSize); err != nil {
		t.Fatal(err)
	}
	sparse := mustOpen(t, fs, "sparse")
	if err := sparse.Truncate(layoutSize); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]vfs.File{"device": mustOpen(t, fs, "dev"), "opaque": opaqueFile{sparse}} {
		e, err := NewEngine(f, EngineOptions{})
		if err != nil {
			t.Fatal(err)
		}
		exts, err := e.Extents(context.Background(), 4096, 100*kib)
		if err != nil || !slices.Equal(exts, []Extent{{Length: 100 * kib}}) {
			t.Errorf("%s: %v, %v; want all data", name, runs(4096, exts), err)
		}
	}
}

// The answer is bounded: a file of alternating blocks maps in several
// calls of at most maxExtents runs each, and the calls add up.
func TestEngineExtentsBounded(t *testing.T) {
	const blocks = 3*maxExtents + 7
	var data [][2]int64
	for b := int64(0); b < blocks; b += 2 {
		data = append(data, [2]int64{b * vfstest.HoleBlock, (b + 1) * vfstest.HoleBlock})
	}
	e, _ := sparseOrigin(t, blocks*vfstest.HoleBlock, data...)
	exts, err := e.Extents(context.Background(), 0, blocks*vfstest.HoleBlock)
	if err != nil {
		t.Fatal(err)
	}
	if len(exts) != maxExtents {
		t.Errorf("one call: %d runs, want %d", len(exts), maxExtents)
	}
	all := mapAll(t, e.Extents, 0, blocks*vfstest.HoleBlock)
	if len(all) != blocks {
		t.Fatalf("whole file: %d runs, want %d", len(all), blocks)
	}
	for i, x := range all {
		if x.Length != vfstest.HoleBlock || x.Hole != (i%2 == 1) {
			t.Fatalf("run %d: %+v", i, x)
		}
	}
}

func TestSnapshotExtents(t *testing.T) {
	for _, transient := range []bool{false, true} {
		t.Run(fmt.Sprint("transient=", transient), func(t *testing.T) {
			ctx := context.Background()
			e, _ := sparseOrigin(t, layoutSize, layoutData...)
			// 16 KiB clusters: [64K, 80K) is data then hole.
			s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: 16 * kib, Transient: transient})
			if err != nil {
				t.Fatal(err)
			}
			check := func(what string, f func(ctx context.Context, off, length int64) ([]Extent, error), want [][3]int64) {
				t.Helper()
				if got := runs(0, mapAll(t, f, 0, layoutSize)); !slices.Equal(got, want) {
					t.Errorf("%s:\n got %v\nwant %v", what, got, want)
				}
			}
			atCreate := [][3]int64{{0, 16 * kib, 1}, {16 * kib, 32 * kib, 0}, {32 * kib, 64 * kib, 1},
				{64 * kib, 68 * kib, 0}, {68 * kib, 160 * kib, 1}, {160 * kib, layoutSize, 0}}
			check("snapshot at create", s.Extents, atCreate)

			// A write into a hole copies its cluster, [96K, 112K): the
			// snapshot has data there now (the copied zeros), the
			// origin only where the write went.
			if err := e.WriteAt(ctx, []byte{1}, 100*kib, false); err != nil {
				t.Fatal(err)
			}
			// A trim of data copies first: [160K, 176K) stays data in
			// the snapshot while the origin has a hole.
			if err := e.Trim(ctx, 160*kib, 16*kib, false); err != nil {
				t.Fatal(err)
			}
			// A write into the partial cluster copies all of it.
			if err := e.WriteAt(ctx, []byte{2}, 76*kib, false); err != nil {
				t.Fatal(err)
			}
			// Zeroing data: copied, data in the snapshot.
			if err := e.Zero(ctx, 16*kib, 16*kib, false); err != nil {
				t.Fatal(err)
			}
			check("origin after the writes", e.Extents, [][3]int64{{0, 64 * kib, 1}, {64 * kib, 68 * kib, 0},
				{68 * kib, 76 * kib, 1}, {76 * kib, 80 * kib, 0}, {80 * kib, 100 * kib, 1}, {100 * kib, 104 * kib, 0},
				{104 * kib, 176 * kib, 1}, {176 * kib, layoutSize, 0}})
			check("snapshot after the writes", s.Extents, [][3]int64{{0, 16 * kib, 1}, {16 * kib, 32 * kib, 0},
				{32 * kib, 64 * kib, 1}, {64 * kib, 80 * kib, 0}, {80 * kib, 96 * kib, 1}, {96 * kib, 112 * kib, 0},
				{112 * kib, 160 * kib, 1}, {160 * kib, layoutSize, 0}})
			// Ranges inside clusters.
			if exts, err := s.Extents(ctx, 66*kib, 20*kib); err != nil ||
				!slices.Equal(runs(66*kib, exts), [][3]int64{{66 * kib, 80 * kib, 0}, {80 * kib, 86 * kib, 1}}) {
				t.Errorf("Extents(66K, 20K) = %v, %v", runs(66*kib, exts), err)
			}
			if _, err := s.Extents(ctx, 0, layoutSize+1); !errors.Is(err, ErrRange) {
				t.Errorf("past the end: %v, want ErrRange", err)
			}

			// An invalid snapshot answers nothing: copy-on-write may
			// have skipped it.
			s.fail("test")
			if _, err := s.Extents(ctx, 0, 4096); !errors.Is(err, ErrInvalid) {
				t.Errorf("invalid snapshot: %v, want ErrInvalid", err)
			}
			if err := e.Clear("s"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Extents(ctx, 0, 4096); !errors.Is(err, ErrCleared) {
				t.Errorf("cleared snapshot: %v, want ErrCleared", err)
			}
		})
	}
}

// A snapshot of an origin that cannot tell holes is all data too.
func TestSnapshotExtentsAllData(t *testing.T) {
	fs := vfstest.NewMemFS()
	if err := fs.CreateDevice("dev", 1<<20); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(mustOpen(t, fs, "dev"), EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return newMemStore(o), nil }
	s, err := e.Create(context.Background(), nil, SnapshotOptions{Name: "s", ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if exts, err := s.Extents(context.Background(), 0, 1<<20); err != nil || !slices.Equal(exts, []Extent{{Length: 1 << 20}}) {
		t.Errorf("%v, %v; want all data", runs(0, exts), err)
	}
}

// refExtents is what a snapshot's map must be once nothing runs: per 4 KiB
// block, a hole if the block was all zeros at the create instant and its
// cluster has not been copied.
func refExtents(s *Snapshot, frozen []byte, off, end int64) []Extent {
	var l extentList
	for pos := off; pos < end; {
		blk := pos &^ (vfstest.HoleBlock - 1)
		next := min(blk+vfstest.HoleBlock, end, int64(len(frozen)))
		hole := !s.cache.copied.get(uint32(pos>>s.geo.shift)) &&
			!slices.ContainsFunc(frozen[blk:min(blk+vfstest.HoleBlock, int64(len(frozen)))], func(b byte) bool { return b != 0 })
		l.add(next-pos, hole)
		pos = next
	}
	return l
}

// TestSnapshotExtentsRace: writes, trims and zeroes of the origin race
// snapshot maps; no map may report a hole where the snapshot holds
// anything but zeros, and once the writers stopped the map is exactly the
// reference. Run it under -race; -extent-seed replays a seed.
func TestSnapshotExtentsRace(t *testing.T) {
	seed := *extentSeed
	if seed == 0 {
		seed = rand.Uint64()
	}
	t.Logf("seed %d (replay with -extent-seed %d)", seed, seed)
	r := rand.New(rand.NewPCG(seed, 1))
	const size = 1<<20 + 3*kib
	blocks := (size + vfstest.HoleBlock - 1) / vfstest.HoleBlock
	var data [][2]int64
	for b := int64(0); b < int64(blocks); b++ {
		if r.IntN(2) == 0 {
			data = append(data, [2]int64{b * vfstest.HoleBlock, min((b+1)*vfstest.HoleBlock, size)})
		}
	}
	e, origin := sparseOrigin(t, size, data...)
	ctx := context.Background()
	cs := []int{4 * kib, 16 * kib, 64 * kib}[r.IntN(3)]
	transient := r.IntN(2) == 0
	t.Logf("cluster size %d, transient %v", cs, transient)
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: cs, Transient: transient})
	if err != nil {
		t.Fatal(err)
	}
	frozen := make([]byte, size)
	if _, err := origin.ReadAt(frozen, 0); err != nil {
		t.Fatal(err)
	}

	var stop atomic.Bool
	var writers, checkers sync.WaitGroup
	ops := 200
	if testing.Short() {
		ops = 50
	}
	for w := range 4 {
		wr := rand.New(rand.NewPCG(seed, uint64(10+w)))
		writers.Go(func() {
			p := make([]byte, 64*kib)
			for range ops {
				off := wr.Int64N(size)
				n := min(wr.Int64N(64*kib)+1, size-off)
				var err error
				switch wr.IntN(4) {
				case 0:
					fillRandom(wr, p[:n])
					p[0] |= 1
					err = e.WriteAt(ctx, p[:n], off, false)
				case 1:
					err = e.Trim(ctx, off, n, false)
				case 2:
					err = e.Zero(ctx, off, n, false)
				case 3:
					clear(p[:n])
					err = e.WriteAt(ctx, p[:n], off, false)
				}
				if err != nil {
					t.Errorf("origin op at %d+%d: %v", off, n, err)
					return
				}
			}
		})
	}
	var checks atomic.Int64
	for c := range 3 {
		cr := rand.New(rand.NewPCG(seed, uint64(100+c)))
		checkers.Go(func() {
			for !stop.Load() {
				off := cr.Int64N(size)
				n := cr.Int64N(size-off) + 1
				exts, err := s.Extents(ctx, off, n)
				if err != nil {
					t.Errorf("snapshot extents at %d+%d: %v", off, n, err)
					return
				}
				checkShape(t, exts, off, n)
				pos := off
				for _, x := range exts {
					if x.Hole && slices.ContainsFunc(frozen[pos:pos+x.Length], func(b byte) bool { return b != 0 }) {
						t.Errorf("hole reported over data the snapshot holds: %v", runs(off, exts))
						return
					}
					pos += x.Length
				}
				oe, err := e.Extents(ctx, off, n)
				if err != nil {
					t.Errorf("origin extents at %d+%d: %v", off, n, err)
					return
				}
				checkShape(t, oe, off, n)
				checks.Add(1)
			}
		})
	}
	writers.Wait()
	stop.Store(true)
	checkers.Wait()
	t.Logf("%d checks raced %d origin modifications", checks.Load(), s.Info().Stats.CowCalls)

	// Quiet: exact, and the holes read as zeros.
	got := mapAll(t, s.Extents, 0, size)
	if want := refExtents(s, frozen, 0, size); !slices.Equal(got, want) {
		t.Fatalf("snapshot map after the writes:\n got %v\nwant %v", runs(0, got), runs(0, want))
	}
	img := make([]byte, size)
	if err := s.ReadAt(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img, frozen) {
		t.Fatal("snapshot does not read as the origin at the create instant")
	}
}
