package backstore

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// overlapBatches are the clusters of TestOverlappingCommits: committed
// before, by Commit A, and by Commit B, which overlaps A's sync.
func overlapBatches() (before, a, b []uint32) {
	return []uint32{100, 101, 102}, []uint32{1, 2, 3, 4, 5}, []uint32{10, 11, 12, 13, 14, 15, 16}
}

// gatedFile holds its first Sync after armed until release is closed, then
// fails it with EIO if fail is set.
type gatedFile struct {
	vfs.File
	armed   atomic.Bool
	atSync  chan struct{}
	release chan struct{}
	fail    bool
}

func (f *gatedFile) Sync() error {
	if f.armed.CompareAndSwap(true, false) {
		close(f.atSync)
		<-f.release
		if f.fail {
			return syscall.EIO
		}
	}
	return f.File.Sync()
}

// runOverlap commits the first of overlapBatches, then starts Commit A and,
// while A is held at its sync, Commit B, which writes its data and then
// waits for A. At that instant it hands a crash image of the store to
// atOverlap; then A's sync runs (or fails, with failSync) and both Commits
// return.
func runOverlap(t *testing.T, seed uint64, failSync bool, atOverlap func(crash *vfstest.MemFS)) (s *Store, fs *vfstest.MemFS, errA, errB error) {
	t.Helper()
	before, a, b := overlapBatches()
	fs = vfstest.NewMemFS()
	f := &gatedFile{File: openMem(t, fs, "store"), atSync: make(chan struct{}), release: make(chan struct{}), fail: failSync}
	s, err := Create(f, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, seed, before...)

	var writes atomic.Int64
	fs.OnOp(func(op vfstest.Op) {
		if op.Kind == vfstest.OpWrite {
			writes.Add(1)
		}
	})
	defer fs.OnOp(nil)
	release := sync.OnceFunc(func() { close(f.release) })
	defer release() // a failed test must not leave Commit A held
	f.armed.Store(true)
	doneA := make(chan error, 1)
	go func() { doneA <- s.Commit(makeBatch(s, seed, a...)) }()
	<-f.atSync
	n0 := writes.Load()
	doneB := make(chan error, 1)
	go func() { doneB <- s.Commit(makeBatch(s, seed, b...)) }()
	// B writes one data slot per cluster, then waits for A.
	for deadline := time.Now().Add(5 * time.Second); writes.Load() < n0+int64(len(b)); {
		select {
		case err := <-doneB:
			t.Fatalf("Commit B returned (%v) while Commit A was held at its sync", err)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("Commit B wrote %d of its %d data slots while Commit A synced", writes.Load()-n0, len(b))
		}
	}
	atOverlap(fs.CrashClone(vfstest.CrashOptions{KeepProbability: 0.5, TornWrites: true}))
	release()
	return s, fs, <-doneA, <-doneB
}

// clusterSet is the set of the given batches' clusters.
func clusterSet(batches ...[]uint32) map[uint32]bool {
	m := map[uint32]bool{}
	for _, b := range batches {
		for _, c := range b {
			m[c] = true
		}
	}
	return m
}

// TestOverlappingCommits: a second Commit writes its data while the first
// syncs, then waits for it. A crash at that instant finds the first's batch
// whole or not at all, and nothing of the second's; both Commits then
// return, their entries in order. A failed sync of the first fails the
// second.
func TestOverlappingCommits(t *testing.T) {
	before, a, b := overlapBatches()
	for seed := uint64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			s, fs, errA, errB := runOverlap(t, seed, false, func(crash *vfstest.MemFS) {
				s, err := Open(openMem(t, crash, "store"), nil)
				if err != nil {
					t.Fatalf("open after a crash during the overlap: %v", err)
				}
				defer s.Close()
				want := clusterSet(before)
				if _, ok := s.Entry(a[0]); ok {
					want = clusterSet(before, a)
				}
				verifyStore(t, s, seed, want)
			})
			if errA != nil || errB != nil {
				t.Fatalf("commits: %v, %v", errA, errB)
			}
			for i, c := range append(append(append([]uint32{}, before...), a...), b...) {
				if n, ok := s.Entry(c); !ok || n != uint32(i) {
					t.Errorf("cluster %d: entry %d, %v; want %d (commit order)", c, n, ok, i)
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s, err := Open(openMem(t, fs, "store"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			verifyStore(t, s, seed, clusterSet(before, a, b))
		})
	}
	t.Run("first sync fails", func(t *testing.T) {
		s, _, errA, errB := runOverlap(t, 1, true, func(*vfstest.MemFS) {})
		if errA == nil || !errors.Is(errB, ErrFailed) {
			t.Fatalf("commits: %v, %v; want the sync's error, then ErrFailed", errA, errB)
		}
		verifyStore(t, s, 1, clusterSet(before))
	})
}
