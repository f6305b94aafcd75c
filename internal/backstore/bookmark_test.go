package backstore

import (
	"errors"
	"slices"
	"testing"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// entriesOf lists a store's clusters by entry number.
func entriesOf(t *testing.T, s *Store) []uint32 {
	t.Helper()
	out := make([]uint32, s.CopiedCount())
	s.ForEachCopied(func(c uint32) {
		e, ok := s.Entry(c)
		if !ok || int(e) >= len(out) {
			t.Fatalf("cluster %d: entry %d, %v of %d", c, e, ok, len(out))
		}
		out[e] = c
	})
	return out
}

// TestBookmark: a store turned into a bookmark keeps its entries in commit
// order, takes clusters without data, refuses reads, frees its data, keeps
// its bases, and all of that survives a clean close and a crash.
func TestBookmark(t *testing.T) {
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.Bases = []Base{{UUID: uuid.UUID{1: 1}, Entries: 7}}
	s, err := Create(openMem(t, fs, "s"), opts)
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 9, 4)
	commitClusters(t, s, 1, 700)
	before := s.Bytes()
	if err := s.Bookmark(); err != nil {
		t.Fatal(err)
	}
	if s.Bytes() >= before {
		t.Errorf("a bookmark counts %d bytes, its snapshot %d", s.Bytes(), before)
	}
	if _, err := s.ReadCluster(9, make([]byte, 512), 0); !errors.Is(err, ErrBookmark) {
		t.Errorf("read of a bookmark: %v, want ErrBookmark", err)
	}
	if err := s.Commit([]Cluster{{Index: 2}, {Index: 1200}}); err != nil {
		t.Fatalf("commit without data to a bookmark: %v", err)
	}
	if err := s.Commit([]Cluster{{Index: 9}}); !errors.Is(err, ErrBadCluster) {
		t.Errorf("second commit of a cluster: %v", err)
	}
	want := []uint32{9, 4, 700, 2, 1200}
	if got := entriesOf(t, s); !slices.Equal(got, want) {
		t.Fatalf("entries %v, want %v", got, want)
	}
	data, _ := fs.Contents("s")
	slot := data[s.geo.slotOff(0):s.geo.slotOff(3)]
	if !allZero(slot) {
		t.Error("the data of the snapshot's clusters was not dropped")
	}
	s.crash()

	for _, clean := range []bool{false, true} {
		s, err := Open(openMem(t, fs, "s"), nil)
		if err != nil {
			t.Fatalf("reopen (clean %v): %v", clean, err)
		}
		h := s.Header()
		if !h.Bookmark || h.Version != 2 || len(h.Bases) != 1 || h.Bases[0] != opts.Bases[0] || h.State != StateValid {
			t.Fatalf("reopened header: %+v", h)
		}
		if got := entriesOf(t, s); !slices.Equal(got, want) {
			t.Fatalf("reopened entries %v, want %v", got, want)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := Check(openMem(t, fs, "s"))
	if err != nil || len(rep.Problems) != 0 {
		t.Fatalf("check of a bookmark: %v %+v", err, rep)
	}
}

// TestBookmarkCrash crashes at every write of a bookmark's life (the
// conversion and commits after it) and reopens: the store is the snapshot
// it was or the bookmark, and holds exactly the committed entries (the
// batch in flight may be kept whole or dropped whole).
func TestBookmarkCrash(t *testing.T) {
	run := func(fs *vfstest.MemFS) {
		s, err := Create(openMem(t, fs, "s"), testOptions())
		if err != nil {
			t.Fatal(err)
		}
		commitClusters(t, s, 1, 5, 6)
		if err := s.Bookmark(); err != nil {
			return
		}
		for i := range uint32(4) {
			if err := s.Commit([]Cluster{{Index: 100 + i}, {Index: 600 + i}}); err != nil {
				return
			}
		}
		s.Close()
	}
	ref := vfstest.NewMemFS()
	run(ref)
	total := ref.MutationCount()
	for k := int64(1); k <= total; k++ {
		fs := vfstest.NewMemFS()
		fs.CrashAt(k, vfstest.CrashOptions{Rand: newRand(uint64(k)), TornWrites: true})
		run(fs)
		c := fs.Crashed()
		if c == nil {
			t.Fatalf("crash point %d not reached", k)
		}
		s, err := Open(openMem(t, c, "s"), nil)
		if err != nil {
			if errors.Is(err, ErrNotStore) {
				continue // the crash came before Create's headers were durable
			}
			t.Fatalf("crash at %d: %v", k, err)
		}
		got := entriesOf(t, s)
		if len(got) < 2 && s.Header().Bookmark {
			t.Fatalf("crash at %d: a bookmark lost its snapshot's entries: %v", k, got)
		}
		for i, c := range got {
			var want uint32
			switch {
			case i < 2:
				want = uint32(5 + i)
			case i%2 == 0:
				want = 100 + uint32(i-2)/2
			default:
				want = 600 + uint32(i-3)/2
			}
			if c != want || len(got)%2 != 0 {
				t.Fatalf("crash at %d: entries %v", k, got)
			}
		}
		if len(got) > 2 && !s.Header().Bookmark {
			t.Fatalf("crash at %d: entries without data in a store that is no bookmark", k)
		}
		s.Close()
	}
}
