package backstore

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestCrashChain crashes the same store again and again: each session
// reopens what the previous crash left, commits random batches (the
// clusters a dropped batch held are the first candidates again, as they are
// for the engine after a restart), and crashes at a random operation, with
// random unsynced and torn writes surviving. This is where what a dropped
// batch leaves behind meets later sessions (see format.go).
//
// After each recovery: every acknowledged cluster is present with its data,
// the interrupted batch is all or nothing, Check passes. A batch dropped by
// an earlier recovery may come back only whole and with the right data: a
// later session rewrote the same clusters, with the same contents, into the
// same slots — harmless, since a cluster's copy is the same whoever writes
// it.
func TestCrashChain(t *testing.T) {
	seeds, sessions := 40, 12
	if testing.Short() {
		seeds = 8
	}
	for seed := uint64(0); seed < uint64(seeds); seed++ {
		if err := crashChain(t, seed, sessions); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
	}
}

func crashChain(t *testing.T, seed uint64, sessions int) error {
	r := rand.New(rand.NewPCG(seed, 77))
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.OriginSize = 1200 * 512
	s, err := Create(openMem(t, fs, "store"), opts)
	if err != nil {
		return err
	}
	s.Close()
	acked := map[uint32]bool{}
	everDropped := map[uint32]bool{}
	var pending []uint32 // clusters of dropped batches, retried first
	for session := 0; session < sessions; session++ {
		s, err := Open(openMem(t, fs, "store"), nil)
		if err != nil {
			return fmt.Errorf("session %d: open: %w", session, err)
		}
		if rec := s.Recovery(); rec.Corrupt != "" || s.Header().State != StateValid {
			return fmt.Errorf("session %d: crash taken for damage: %q", session, s.Header().Reason)
		}
		// Verify the recovered state against what the previous session
		// acknowledged.
		got := map[uint32]bool{}
		s.ForEachCopied(func(c uint32) { got[c] = true })
		for c := range acked {
			if !got[c] {
				return fmt.Errorf("session %d: acknowledged cluster %d lost", session, c)
			}
		}
		for c := range got {
			if !acked[c] && !everDropped[c] {
				return fmt.Errorf("session %d: cluster %d present but never committed", session, c)
			}
			p := make([]byte, s.geo.clusterLen(c))
			if ok, err := s.ReadCluster(c, p, 0); !ok || err != nil || !bytes.Equal(p, clusterData(seed, c, int64(len(p)))) {
				return fmt.Errorf("session %d: cluster %d: %v %v or wrong data", session, c, ok, err)
			}
		}
		if _, err := Check(openMem(t, fs, "store")); err != nil {
			return fmt.Errorf("session %d: check: %w", session, err)
		}
		acked = got
		var fresh []uint32
		for _, c := range pending {
			if !got[c] {
				fresh = append(fresh, c)
			}
		}
		for _, c := range r.Perm(1200) {
			if !got[uint32(c)] && !contains(fresh, uint32(c)) {
				fresh = append(fresh, uint32(c))
			}
		}
		pending = nil

		// This session: commit until the crash point, then crash.
		crashAt := fs.MutationCount() + 1 + r.Int64N(120)
		fs.CrashAt(crashAt, vfstest.CrashOptions{Rand: rand.New(rand.NewPCG(seed, uint64(session))), TornWrites: r.IntN(2) == 0})
		var inflight []uint32
		for fs.Crashed() == nil && len(fresh) > 0 {
			n := min(len(fresh), 1+r.IntN(8))
			if r.IntN(10) == 0 {
				n = min(len(fresh), 300+r.IntN(300))
			}
			batch := fresh[:n]
			fresh = fresh[n:]
			err := s.Commit(makeBatch(s, seed, batch...))
			if fs.Crashed() != nil {
				inflight = batch
				break
			}
			if err != nil {
				return fmt.Errorf("session %d: commit: %w", session, err)
			}
			for _, c := range batch {
				acked[c] = true
			}
		}
		if fs.Crashed() == nil {
			return nil // the origin is fully copied
		}
		c := fs.Crashed()
		// The interrupted batch: all or nothing, judged on the clone.
		probe, err := Open(openMem(t, c.CrashClone(vfstest.CrashOptions{}), "store"), nil)
		if err != nil {
			return fmt.Errorf("session %d: open after crash: %w", session, err)
		}
		in := 0
		for _, cl := range inflight {
			if probe.Copied(cl) {
				in++
			}
		}
		probe.Close()
		if in != 0 && in != len(inflight) {
			return fmt.Errorf("session %d: interrupted batch of %d recovered partly (%d)", session, len(inflight), in)
		}
		if in == len(inflight) {
			for _, cl := range inflight {
				acked[cl] = true
			}
		} else {
			for _, cl := range inflight {
				everDropped[cl] = true
			}
			pending = inflight
		}
		fs = c
	}
	return nil
}

func contains(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestStrayBeyondScan builds, write by write, the case the batch base
// exists for: a batch B torn so that its version of block 1 never landed
// while its version of block 2 did. Recovery's scan stops at block 1 and
// never sees that stray; B is dropped. If the next session numbered its
// batches from the highest number seen plus one, its first batch C would
// share B's number, and a later torn batch D would leave two different
// batches stamped alike — unrecoverable. The batch base prevents that.
func TestStrayBeyondScan(t *testing.T) {
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.OriginSize = 3000 * 512
	s, err := Create(openMem(t, fs, "store"), opts)
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
	f := openMem(t, fs, "store")
	read := func(off int64) []byte {
		b := make([]byte, blockSize)
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
	commitClusters(t, s, 6, seq(0, 10)...)        // A: block 0, physical slot 0
	commitClusters(t, s, 6, seq(10, 1210)...)     // B: blocks 0 (slot 1), 1, 2
	write(metaOff(0, 1), make([]byte, blockSize)) // B's block 0 and block 1 "never landed"
	write(metaOff(1, 0), make([]byte, blockSize))
	s.crash()

	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CopiedCount(); n != 10 {
		t.Fatalf("after dropping B: %d clusters, want 10", n)
	}
	commitClusters(t, s, 6, seq(10, 20)...) // C: block 0, slot 1
	block0, block2 := read(metaOff(0, 0)), read(metaOff(2, 0))
	commitClusters(t, s, 6, seq(20, 1100)...) // D: blocks 0 (slot 0), 1, 2
	write(metaOff(0, 0), block0)              // D's block 0 and block 2 "never landed"
	write(metaOff(2, 0), block2)
	s.crash()

	if _, err := Check(openMem(t, fs, "store")); err != nil {
		t.Fatalf("check: %v", err)
	}
	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	want := map[uint32]bool{}
	for _, c := range seq(0, 20) {
		want[c] = true
	}
	verifyStore(t, s, 6, want)
}
