package backstore

import (
	"bytes"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestCompleteStrayBehindIncompleteBatch builds, write by write, the case
// the leftover rule of recovery exists for (format.go: "Judging newest
// first, an incomplete batch bounds the committed state…"):
//
//   - Session 1 commits A (clusters 0…9) and then S (10…1099, blocks 0, 1,
//     2), which a crash tears: one data slot never landed. Recovery drops S
//     (in flight); its metadata versions stay on disk, a stray.
//   - Session 2 copies S's clusters again, in the same order and with the
//     same bytes, and more: D (10…1599, blocks 0…3). A crash tears D: all
//     its data landed, and its block 3, but none of its blocks 0…2, so S's
//     versions of those are still there. D's data filled S's missing slot
//     with the very bytes S had: S is now complete on disk.
//
// D is the newest batch and incomplete: the committed state ends where D
// began (entry 10), so S, which reaches past that, is a leftover and must
// be skipped unexamined; the committed state is A. Were S examined, it
// would be found complete and taken, and its end (1100) would contradict
// D's start: Open would fail with ErrCorrupt on a store a crash left.
// (That is all the rule can change: whatever batch recovery takes must end
// exactly at the bound the incomplete batches set, or Open fails, so
// skipping the batches that reach past the bound never changes the state
// recovered, only whether Open succeeds.) Kills: dropping the rule (its
// continue, or its condition).
func TestCompleteStrayBehindIncompleteBatch(t *testing.T) {
	const seed = 6
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "store"), testOptions()) // 3000 clusters: 6 metadata blocks
	if err != nil {
		t.Fatal(err)
	}
	seq := func(lo, hi uint32) []uint32 {
		var cs []uint32
		for c := lo; c < hi; c++ {
			cs = append(cs, c)
		}
		return cs
	}
	want := func(cs []uint32) map[uint32]bool {
		m := map[uint32]bool{}
		for _, c := range cs {
			m[c] = true
		}
		return m
	}
	f := openMem(t, fs, "store")
	read := func(off int64, n int) []byte {
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}
	write := func(off int64, b []byte) {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}

	// Session 1: A, then S torn in its data slot 600 (cluster 600).
	commitClusters(t, s, seed, seq(0, 10)...)    // A, batch 1: block 0 slot 0
	commitClusters(t, s, seed, seq(10, 1100)...) // S, batch 2: block 0 slot 1, blocks 1 and 2 slot 0
	torn := s.geo.slotOff(600)
	write(torn, make([]byte, 512))
	s.crash()

	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	rec := s.Recovery()
	if rec.CommittedBatch != 1 || rec.Clusters != 10 || len(rec.Dropped) != 1 ||
		rec.Dropped[0].Batch != 2 || rec.Dropped[0].Leftover {
		t.Fatalf("session 2 recovery: %+v, want batch 1 with 10 clusters, S (batch 2) dropped in flight", rec)
	}
	if h := s.Header(); h.BatchBase != 4 {
		t.Fatalf("session 2 batch base %d, want 4", h.BatchBase)
	}

	// Session 2: D, batch 4, over the same blocks and physical slots as S
	// (and block 3), torn so that only its data and its block 3 landed.
	strays := map[[2]int64][]byte{} // S's metadata versions: (block, slot) → bytes
	for _, bs := range [][2]int64{{0, 1}, {1, 0}, {2, 0}} {
		strays[bs] = read(metaOff(bs[0], int(bs[1])), blockSize)
	}
	commitClusters(t, s, seed, seq(10, 1600)...)
	for bs, b := range strays {
		write(metaOff(bs[0], int(bs[1])), b)
	}
	if !bytes.Equal(read(torn, 512), clusterData(seed, 600, 512)) {
		t.Fatal("D did not rewrite S's torn data slot with S's bytes")
	}
	s.crash()
	if err := f.Sync(); err != nil { // so that the clone below sees the torn state
		t.Fatal(err)
	}

	// The premise: S is complete now. Without D's block 3 (nothing newer
	// than S), recovery takes S, which is harmless: every entry of it
	// checks against its CRC.
	alone := fs.CrashClone(vfstest.CrashOptions{})
	g := openMem(t, alone, "store")
	if _, err := g.WriteAt(make([]byte, blockSize), metaOff(3, 0)); err != nil {
		t.Fatal(err)
	}
	g.Close()
	sa, err := Open(openMem(t, alone, "store"), nil)
	if err != nil {
		t.Fatalf("the premise: open without D: %v", err)
	}
	if rec := sa.Recovery(); rec.CommittedBatch != 2 {
		t.Fatalf("the premise: without D, recovery takes batch %d, want S (2): %+v", rec.CommittedBatch, rec)
	}
	verifyStore(t, sa, seed, want(seq(0, 1100)))
	sa.Close()

	// The case: D, incomplete, bounds the committed state to entry 10.
	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	verifyStore(t, s, seed, want(seq(0, 10)))
	rec = s.Recovery()
	if rec.CommittedBatch != 1 || rec.Clusters != 10 || rec.Corrupt != "" || len(rec.Dropped) != 2 {
		t.Fatalf("recovery: %+v, want batch 1 with 10 clusters and two batches dropped", rec)
	}
	for i, w := range []DroppedBatch{
		{Batch: 4, First: 10, Total: 1600, Leftover: false, Why: "metadata block 0 has no valid version of it"},
		{Batch: 2, First: 10, Total: 1100, Leftover: true, Why: "reaches past a newer incomplete batch"},
	} {
		d := rec.Dropped[i]
		if d.Batch != w.Batch || d.First != w.First || d.Total != w.Total || d.Leftover != w.Leftover || !strings.Contains(d.Why, w.Why) {
			t.Errorf("dropped[%d] = %+v, want %+v", i, d, w)
		}
	}
	if n := rec.DroppedClusters(); n != 1590 {
		t.Errorf("recovery dropped %d clusters, want 1590 (D's; S was dropped before)", n)
	}
	// Check, which writes nothing, judges the same way.
	rep, err := Check(openMem(t, fs, "store"))
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if rep.Clusters != 10 || rep.CommittedBatch != 1 || len(rep.Dropped) != 2 || !rep.Dropped[1].Leftover {
		t.Errorf("check: batch %d with %d clusters, dropped %+v; want batch 1 with 10, and S a leftover", rep.CommittedBatch, rep.Clusters, rep.Dropped)
	}

	// Life goes on: the next batch overwrites the strays, and a reopen
	// finds it.
	commitClusters(t, s, seed, seq(10, 30)...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	verifyStore(t, s, seed, want(seq(0, 30)))
	if _, err := Check(openMem(t, fs, "store")); err != nil {
		t.Fatalf("check after the next session: %v", err)
	}
}
