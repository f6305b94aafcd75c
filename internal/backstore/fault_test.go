package backstore

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestFaultInjection fails the store's WriteAt or Sync with ENOSPC or EIO at
// a random point (some writes short, as a full file system does). Commit
// must return the error (wrapping ErrFull exactly for ENOSPC), refuse further
// batches, and the store must reopen at its last committed state — plus the
// failed batch entirely or not at all — whether the crash that follows keeps
// the unsynced writes or not.
func TestFaultInjection(t *testing.T) {
	cases := 0
	for _, kind := range []vfstest.OpKind{vfstest.OpWrite, vfstest.OpSync} {
		for _, errno := range []syscall.Errno{syscall.ENOSPC, syscall.EIO} {
			for seed := uint64(0); seed < 25; seed++ {
				name := fmt.Sprintf("%s/%s/seed%d", kind, errno, seed)
				t.Run(name, func(t *testing.T) {
					faultCase(t, kind, errno, seed)
				})
				cases++
			}
		}
	}
}

func faultCase(t *testing.T, kind vfstest.OpKind, errno syscall.Errno, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 99))
	mem := vfstest.NewMemFS()
	ff := vfstest.NewFaultFS(mem)
	f, err := ff.OpenFile("store", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions()
	s, err := Create(f, opts)
	if err != nil {
		t.Fatal(err)
	}
	// Fail the n-th operation of this kind from now on, and every later one
	// (a full or broken disk stays so).
	nth := int64(1 + r.IntN(60))
	if kind == vfstest.OpSync {
		nth = int64(1 + r.IntN(8))
	}
	ff.Inject(vfstest.Rule{Kind: kind, Nth: nth, Times: -1, Err: errno, Partial: r.IntN(2) == 0})

	acked := map[uint32]bool{}
	var failed []uint32
	perm := r.Perm(3000)
	for i := 0; failed == nil; i++ {
		if i >= 100 {
			t.Fatal("no fault after 100 batches")
		}
		cs := make([]uint32, 1+r.IntN(10))
		for j := range cs {
			cs[j] = uint32(perm[0])
			perm = perm[1:]
		}
		err := s.Commit(makeBatch(s, seed, cs...))
		switch {
		case err == nil:
			for _, c := range cs {
				acked[c] = true
			}
			continue
		case !errors.Is(err, errno):
			t.Fatalf("commit failed with %v, want %v", err, errno)
		case errors.Is(err, ErrFull) != (errno == syscall.ENOSPC):
			t.Fatalf("commit error %v: ErrFull must be wrapped exactly for ENOSPC", err)
		}
		failed = cs
	}
	if err := s.Commit(makeBatch(s, seed, uint32(perm[0]))); !errors.Is(err, ErrFailed) {
		t.Fatalf("commit after a failure: %v, want ErrFailed", err)
	}
	// Reads of what was committed still work.
	verifyStore(t, s, seed, acked)
	// The engine now invalidates; that may fail too (the disk is broken).
	invErr := s.Invalidate("store write failed")
	if s.Header().State != StateInvalid {
		t.Error("Invalidate left the store valid in memory")
	}
	s.Close()

	for _, keep := range []bool{false, true} {
		c := mem.CrashClone(vfstest.CrashOptions{})
		if keep {
			c = mem.CrashClone(vfstest.CrashOptions{Rand: rand.New(rand.NewPCG(seed, 5)), KeepProbability: 1})
		}
		if _, err := Check(openMem(t, c, "store")); err != nil {
			t.Fatalf("keep=%v: Check: %v", keep, err)
		}
		s2, err := Open(openMem(t, c, "store"), nil)
		if err != nil {
			t.Fatalf("keep=%v: open after fault: %v", keep, err)
		}
		want := map[uint32]bool{}
		for c := range acked {
			want[c] = true
		}
		if s2.Copied(failed[0]) {
			for _, c := range failed {
				want[c] = true
			}
		}
		verifyStore(t, s2, seed, want)
		if invErr == nil && s2.Header().State != StateInvalid {
			t.Errorf("keep=%v: acknowledged invalidation lost", keep)
		}
		s2.Close()
	}
}

func TestReadFault(t *testing.T) {
	mem := vfstest.NewMemFS()
	ff := vfstest.NewFaultFS(mem)
	f, _ := ff.OpenFile("store", os.O_RDWR|os.O_CREATE, 0o600)
	s, err := Create(f, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 4, 5, 6)
	ff.Inject(vfstest.Rule{Kind: vfstest.OpRead, Times: -1})
	if ok, err := s.ReadCluster(5, make([]byte, 512), 0); !ok || !errors.Is(err, syscall.EIO) {
		t.Fatalf("ReadCluster with failing reads: %v, %v; want true, EIO", ok, err)
	}
	s.Close()
	f, _ = ff.OpenFile("store", os.O_RDWR, 0)
	if _, err := Open(f, nil); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Open with failing reads: %v, want EIO", err)
	}
	if _, err := Check(f); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Check with failing reads: %v, want EIO", err)
	}
	ff.Reset()
	s2, err := Open(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	verifyStore(t, s2, 1, map[uint32]bool{4: true, 5: true, 6: true})
}

func TestMaxSizeAndDevice(t *testing.T) {
	t.Run("max-size", func(t *testing.T) {
		fs := vfstest.NewMemFS()
		opts := testOptions()
		g, _ := geometryOf(opts.ClusterSize, opts.OriginSize, true)
		opts.MaxSize = g.dataStart + 10*512
		s, err := Create(openMem(t, fs, "s"), opts)
		if err != nil {
			t.Fatal(err)
		}
		commitClusters(t, s, 2, 0, 1, 2, 3, 4, 5, 6, 7)
		if err := s.Commit(makeBatch(s, 2, 8, 9, 10)); !errors.Is(err, ErrFull) {
			t.Fatalf("commit past MaxSize: %v, want ErrFull", err)
		}
		// Nothing was written: the store is intact and takes what fits.
		commitClusters(t, s, 2, 8, 9)
		if err := s.Commit(makeBatch(s, 2, 10)); !errors.Is(err, ErrFull) {
			t.Fatalf("commit past MaxSize: %v, want ErrFull", err)
		}
		verifyStore(t, s, 2, map[uint32]bool{0: true, 1: true, 2: true, 3: true, 4: true, 5: true, 6: true, 7: true, 8: true, 9: true})
		if _, err := Create(openMem(t, fs, "t"), Options{ClusterSize: 512, OriginSize: 1 << 20, MaxSize: 100}); !errors.Is(err, ErrOptions) {
			t.Errorf("MaxSize smaller than the metadata: %v, want ErrOptions", err)
		}
	})
	t.Run("device", func(t *testing.T) {
		fs := vfstest.NewMemFS()
		opts := testOptions()
		g, _ := geometryOf(opts.ClusterSize, opts.OriginSize, true)
		if err := fs.CreateDevice("small", g.dataStart); err != nil {
			t.Fatal(err)
		}
		if _, err := Create(openMem(t, fs, "small"), opts); !errors.Is(err, ErrFull) {
			t.Fatalf("device too small for any data: %v, want ErrFull", err)
		}
		// A device that held an earlier store: its stale metadata belongs
		// to another UUID and must be ignored.
		if err := fs.CreateDevice("dev", g.dataStart+5*512); err != nil {
			t.Fatal(err)
		}
		old, err := Create(openMem(t, fs, "dev"), opts)
		if err != nil {
			t.Fatal(err)
		}
		commitClusters(t, old, 3, 10, 11, 12, 13)
		old.Close()
		s, err := Create(openMem(t, fs, "dev"), opts)
		if err != nil {
			t.Fatal(err)
		}
		if !s.Header().FixedSize {
			t.Error("store on a device not marked fixed-size")
		}
		commitClusters(t, s, 4, 1, 2)
		if err := s.Commit(makeBatch(s, 4, 3, 4, 5, 6)); !errors.Is(err, ErrFull) {
			t.Fatalf("commit past the device's end: %v, want ErrFull", err)
		}
		commitClusters(t, s, 4, 3, 4, 5)
		s.Close()
		s2, err := Open(openMem(t, fs, "dev"), nil)
		if err != nil {
			t.Fatal(err)
		}
		verifyStore(t, s2, 4, map[uint32]bool{1: true, 2: true, 3: true, 4: true, 5: true})
	})
}

func TestBadBatches(t *testing.T) {
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.OriginSize = 10*512 + 1 // cluster 10 is one byte long
	s, err := Create(openMem(t, fs, "s"), opts)
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 5, 1)
	for _, tc := range []struct {
		name  string
		batch []Cluster
	}{
		{"out of range", []Cluster{{Index: 11, Data: make([]byte, 512)}}},
		{"already copied", []Cluster{{Index: 1, Data: make([]byte, 512)}}},
		{"twice", []Cluster{{Index: 2, Data: make([]byte, 512)}, {Index: 2, Data: make([]byte, 512)}}},
		{"short data", []Cluster{{Index: 3, Data: make([]byte, 511)}}},
		{"long data", []Cluster{{Index: 3, Data: make([]byte, 513)}}},
		{"empty last cluster", []Cluster{{Index: 10, Data: nil}}},
	} {
		if err := s.Commit(tc.batch); !errors.Is(err, ErrBadCluster) {
			t.Errorf("%s: %v, want ErrBadCluster", tc.name, err)
		}
	}
	// The partial last cluster, as a short or a full buffer.
	if err := s.Commit([]Cluster{{Index: 10, Data: []byte{42}}}); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1)
	if ok, err := s.ReadCluster(10, p, 0); !ok || err != nil || p[0] != 42 {
		t.Fatalf("last cluster: %v %v %v", ok, err, p)
	}
	if _, err := s.ReadCluster(10, make([]byte, 2), 0); err == nil {
		t.Error("read past the end of the last cluster succeeded")
	}
	if err := s.Commit(nil); err != nil {
		t.Errorf("empty batch: %v", err)
	}
	if err := s.Invalidate("full"); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(makeBatch(s, 5, 4)); !errors.Is(err, ErrInvalid) {
		t.Errorf("commit on an invalid store: %v, want ErrInvalid", err)
	}
	if err := s.Invalidate("second reason"); err != nil || s.Header().Reason != "full" {
		t.Errorf("second Invalidate: %v, reason %q; the first reason must stay", err, s.Header().Reason)
	}
	s.Close()
	if err := s.Commit(makeBatch(s, 5, 4)); !errors.Is(err, ErrClosed) {
		t.Errorf("commit after close: %v, want ErrClosed", err)
	}
	s2, err := Open(openMem(t, fs, "s"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h := s2.Header(); h.State != StateInvalid || h.Reason != "full" {
		t.Errorf("after reopen: state %v reason %q", h.State, h.Reason)
	}
}
