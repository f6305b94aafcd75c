package backstore

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// cleanFixture is a store of three batches; the last one's clusters and
// entries are known, so that a test can damage exactly them.
type cleanFixture struct {
	fs        *vfstest.MemFS
	s         *Store
	all       map[uint32]bool // every committed cluster
	last      []uint32        // the clusters of the last batch
	lastFirst uint32          // its first entry (data slot)
	lastBatch uint64
}

const cleanSeed = 11

// newCleanFixture commits batch 1 (10 clusters, block 0 slot 0), batch 2
// (600 clusters: block 0 slot 1, block 1 slot 0) and a last batch of
// lastN clusters starting at entry 610: with lastN 20 it rewrites only
// block 1 (into slot 1); with lastN 500 it also writes block 2 (slot 0,
// its only version).
func newCleanFixture(t *testing.T, lastN int) *cleanFixture {
	t.Helper()
	fx := &cleanFixture{fs: vfstest.NewMemFS(), all: map[uint32]bool{}}
	s, err := Create(openMem(t, fx.fs, "store"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	perm := newRand(5).Perm(3000)
	next := 0
	for _, n := range []int{10, 600, lastN} {
		var cs []uint32
		for _, c := range perm[next : next+n] {
			cs = append(cs, uint32(c))
			fx.all[uint32(c)] = true
		}
		fx.lastFirst = uint32(next)
		next += n
		commitClusters(t, s, cleanSeed, cs...)
		fx.last = cs
	}
	fx.lastBatch = s.lastBatch
	fx.s = s
	return fx
}

// flip overwrites 16 bytes at off with their complement, as a bad sector or
// a stray write would.
func (fx *cleanFixture) flip(t *testing.T, off int64) {
	t.Helper()
	f := openMem(t, fx.fs, "store")
	defer f.Close()
	b := make([]byte, 16)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = ^b[i]
	}
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestCleanCloseThenDamage: a store closed cleanly whose last committed
// batch is damaged afterwards (its data or its metadata) must not open as
// a valid store without that batch — the origin was already overwritten
// for its clusters. It opens invalid with a persisted reason, never serves
// the damaged clusters, and Check reports a problem; a later reopen still
// sees the damage.
func TestCleanCloseThenDamage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		lastN  int
		damage func(fx *cleanFixture) int64 // returns the offset to flip
		why    string                       // in the reason
	}{
		{"data of the last batch", 20, func(fx *cleanFixture) int64 {
			return fx.s.geo.slotOff(fx.lastFirst+5) + 100
		}, "fails its checksum"},
		{"last bytes of the file", 20, func(fx *cleanFixture) int64 {
			return fx.s.geo.slotOff(fx.lastFirst+19) + 496
		}, "fails its checksum"},
		{"tail metadata block of the last batch", 20, func(*cleanFixture) int64 {
			return metaOff(1, 1) + 200
		}, "metadata of batch"},
		{"new metadata block of the last batch", 500, func(*cleanFixture) int64 {
			return metaOff(2, 0) + 60
		}, "metadata block 2 has no valid version"},
		{"rewritten metadata block of a batch spanning two", 500, func(*cleanFixture) int64 {
			return metaOff(1, 1) + 60
		}, "metadata block 1 has no valid version of it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newCleanFixture(t, tc.lastN)
			off := tc.damage(fx)
			if err := fx.s.Close(); err != nil {
				t.Fatal(err)
			}
			before, err := Check(openMem(t, fx.fs, "store"))
			if err != nil || !before.Header.Clean || before.Header.CleanBatch != fx.lastBatch || before.Header.CleanCount != uint32(len(fx.all)) {
				t.Fatalf("check after clean close: %+v, %v", before.Header, err)
			}
			fx.flip(t, off)

			rep, err := Check(openMem(t, fx.fs, "store"))
			if !errors.Is(err, ErrCorrupt) || rep.Recovery.Corrupt == "" || len(rep.Problems) == 0 ||
				!strings.Contains(rep.Problems[0], "store corrupt") {
				t.Fatalf("Check of the damaged store: %v; problems %q", err, rep.Problems)
			}
			contents, _ := fx.fs.Contents("store")

			s, err := Open(openMem(t, fx.fs, "store"), nil)
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			h := s.Header()
			if h.State != StateInvalid || !strings.HasPrefix(h.Reason, "store corrupt:") || !strings.Contains(h.Reason, tc.why) {
				t.Fatalf("state %v, reason %q; want invalid, \"store corrupt: …%s…\"", h.State, h.Reason, tc.why)
			}
			if rec := s.Recovery(); rec.Corrupt != h.Reason || !rec.Clean {
				t.Errorf("recovery %+v", rec)
			}
			t.Logf("reason: %s", h.Reason)
			checkNoWrongData(t, s, fx)
			if err := s.Commit(makeBatch(s, cleanSeed, 2999)); !errors.Is(err, ErrInvalid) {
				t.Errorf("commit to the damaged store: %v, want ErrInvalid", err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			// Check wrote nothing (Open did: the header).
			if !bytes.Equal(contents[2*headerSize:], mustContents(t, fx.fs)[2*headerSize:]) {
				t.Error("the store's metadata or data changed")
			}

			// The reason is persisted, and the damage is still seen.
			s, err = Open(openMem(t, fx.fs, "store"), nil)
			if err != nil {
				t.Fatal(err)
			}
			if h2 := s.Header(); h2.State != StateInvalid || h2.Reason != h.Reason || s.Recovery().Corrupt == "" {
				t.Errorf("reopen: %v %q, recovery %+v", h2.State, h2.Reason, s.Recovery())
			}
			checkNoWrongData(t, s, fx)
			s.Close()
			if _, err := Check(openMem(t, fx.fs, "store")); !errors.Is(err, ErrCorrupt) {
				t.Errorf("check after the second close: %v, want ErrCorrupt", err)
			}
		})
	}
}

// checkNoWrongData: every cluster s says it holds reads back as committed,
// and the last batch's clusters are either absent or right.
func checkNoWrongData(t *testing.T, s *Store, fx *cleanFixture) {
	t.Helper()
	for c := range fx.all {
		p := make([]byte, s.geo.clusterLen(c))
		ok, err := s.ReadCluster(c, p, 0)
		if err != nil {
			t.Fatalf("read cluster %d: %v", c, err)
		}
		if ok && !bytes.Equal(p, clusterData(cleanSeed, c, int64(len(p)))) {
			t.Fatalf("cluster %d: wrong data served", c)
		}
	}
	if n := s.CopiedCount(); n != len(fx.all)-len(fx.last) {
		t.Errorf("store holds %d clusters; want the %d of the intact batches", n, len(fx.all)-len(fx.last))
	}
}

func mustContents(t *testing.T, fs *vfstest.MemFS) []byte {
	t.Helper()
	b, err := fs.Contents("store")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCrashThenTornBatch: without a clean close, the same damage is what
// a crash during the last Commit leaves, and the batch is dropped as
// before — but visibly: Recovery and Check's notices name it (a batch
// whose data is torn by number and size; one whose only metadata block is
// torn by the unreadable block, as nothing else of it can be read).
func TestCrashThenTornBatch(t *testing.T) {
	for _, tc := range []struct {
		name    string
		off     func(fx *cleanFixture) int64
		dropped bool   // the batch is listed as dropped
		notice  string // in Check's one notice
	}{
		{"data", func(fx *cleanFixture) int64 { return fx.s.geo.slotOff(fx.lastFirst+5) + 100 }, true, "in flight at a crash"},
		{"metadata", func(*cleanFixture) int64 { return metaOff(1, 1) + 200 }, false, "metadata block 1 slot 1: checksum"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newCleanFixture(t, 20)
			off := tc.off(fx)
			fx.s.crash()
			fx.flip(t, off)

			rep, err := Check(openMem(t, fx.fs, "store"))
			if err != nil || rep.Header.Clean || len(rep.Notices) != 1 || !strings.Contains(rep.Notices[0], tc.notice) {
				t.Fatalf("Check: %v; notices %q", err, rep.Notices)
			}
			s, err := Open(openMem(t, fx.fs, "store"), nil)
			if err != nil {
				t.Fatal(err)
			}
			if s.Header().State != StateValid {
				t.Fatalf("store invalid after a crash: %q", s.Header().Reason)
			}
			rec := s.Recovery()
			if rec.Clean || rec.Corrupt != "" || rec.CommittedBatch != fx.lastBatch-1 {
				t.Fatalf("recovery %+v", rec)
			}
			if tc.dropped {
				if len(rec.Dropped) != 1 || rec.Dropped[0].Batch != fx.lastBatch || rec.Dropped[0].Leftover ||
					rec.DroppedClusters() != len(fx.last) || len(rec.Unreadable) != 0 {
					t.Fatalf("recovery %+v", rec)
				}
			} else if len(rec.Dropped) != 0 || len(rec.Unreadable) != 1 {
				t.Fatalf("recovery %+v", rec)
			}
			checkNoWrongData(t, s, fx)
			// What the dropped batch left behind is a leftover for the next
			// recovery, not a loss.
			s.crash()
			s, err = Open(openMem(t, fx.fs, "store"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			rec = s.Recovery()
			if tc.dropped && (len(rec.Dropped) != 1 || !rec.Dropped[0].Leftover) || rec.DroppedClusters() != 0 {
				t.Errorf("second recovery %+v", rec)
			}
			// The next batch overwrites what the dropped one left.
			commitClusters(t, s, cleanSeed, 2999)
			if rep, err := Check(openMem(t, fx.fs, "store")); err != nil || len(rep.Notices) != 0 {
				t.Errorf("check after a new batch: %v, notices %q", err, rep.Notices)
			}
		})
	}
}

// TestCleanMarkLifecycle: Create leaves no mark; Close records it (also
// for an empty store and an invalid one); Open clears it on disk before
// any batch; a failed store is not marked.
func TestCleanMarkLifecycle(t *testing.T) {
	fs := vfstest.NewMemFS()
	header := func() Header {
		t.Helper()
		rep, err := Check(openMem(t, fs, "store"))
		if err != nil {
			t.Fatal(err)
		}
		return rep.Header
	}
	s, err := Create(openMem(t, fs, "store"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	if h := header(); h.Clean {
		t.Fatal("a created store is marked clean")
	}
	s.Close()
	if h := header(); !h.Clean || h.CleanBatch != 0 || h.CleanCount != 0 {
		t.Fatalf("empty store after close: %+v", h)
	}
	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h := header(); h.Clean {
		t.Fatal("the mark survived a writable Open")
	}
	commitClusters(t, s, 1, 4, 5)
	commitClusters(t, s, 1, 6)
	if err := s.Invalidate("origin write failed"); err != nil {
		t.Fatal(err)
	}
	batch := s.lastBatch
	s.Close()
	if h := header(); !h.Clean || h.CleanBatch != batch || h.CleanCount != 3 || h.State != StateInvalid || h.Reason != "origin write failed" {
		t.Fatalf("after close: %+v", h)
	}
	s, err = Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h := s.Header(); h.State != StateInvalid || h.Reason != "origin write failed" || s.Recovery().Corrupt != "" || !s.Recovery().Clean {
		t.Fatalf("reopen: %+v %+v", h, s.Recovery())
	}
	s.Close()

	// A store whose Commit failed is closed without the mark.
	mem := vfstest.NewMemFS()
	ff := vfstest.NewFaultFS(mem)
	f, err := ff.OpenFile("store", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	s, err = Create(f, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 1)
	ff.Inject(vfstest.Rule{Kind: vfstest.OpSync, Nth: 1, Times: 1, Err: syscall.EIO})
	if err := s.Commit(makeBatch(s, 1, 2)); err == nil {
		t.Fatal("commit with a failing sync succeeded")
	}
	s.Close()
	rep, err := Check(openMem(t, mem, "store"))
	if err != nil || rep.Header.Clean {
		t.Fatalf("failed store: clean %v, %v", rep.Header.Clean, err)
	}
}

// TestStaleCleanMark: the header slot a later session's Open wrote (mark
// cleared) is lost, so the older slot's mark is read, but the disk holds
// batches committed after it. That is not damage to the data: recovery
// stands as after a crash, and Check says so in a notice.
func TestStaleCleanMark(t *testing.T) {
	fx := newCleanFixture(t, 20)
	fx.s.Close()
	s, err := Open(openMem(t, fx.fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, cleanSeed, 2999)
	fx.all[2999] = true
	cur := int64(s.Header().Generation % 2)
	s.crash()
	fx.flip(t, cur*headerSize+300) // the current header slot

	rep, err := Check(openMem(t, fx.fs, "store"))
	if err != nil || !rep.Header.Clean || !rep.Recovery.StaleClean || len(rep.Notices) != 1 {
		t.Fatalf("Check: %v; %+v", err, rep)
	}
	s, err = Open(openMem(t, fx.fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Header().State != StateValid || !s.Recovery().StaleClean {
		t.Fatalf("state %v %q, recovery %+v", s.Header().State, s.Header().Reason, s.Recovery())
	}
	verifyStore(t, s, cleanSeed, fx.all)
}

// TestGapIsDamage: after a crash (no mark), a committed full block that lost
// its only version while the next block holds a batch that began after it
// cannot be a torn write: Open refuses with ErrCorrupt instead of
// recovering an empty or shorter store.
func TestGapIsDamage(t *testing.T) {
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "store"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	var cs []uint32
	for c := uint32(0); c < 505; c++ {
		cs = append(cs, c)
	}
	commitClusters(t, s, 3, cs...)    // block 0, full, its only version (slot 0)
	commitClusters(t, s, 3, 600, 601) // block 1, F = 505
	s.crash()
	fx := &cleanFixture{fs: fs}
	fx.flip(t, metaOff(0, 0)+100)
	if _, err := Open(openMem(t, fs, "store"), nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "block 0 has no valid version") {
		t.Fatalf("open: %v, want ErrCorrupt naming block 0", err)
	}
	if _, err := Check(openMem(t, fs, "store")); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("check: %v, want ErrCorrupt", err)
	}
}
