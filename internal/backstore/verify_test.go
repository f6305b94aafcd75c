package backstore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestReadClusterVerifies: every read of a cluster, whole or part, is
// checked against the checksum recorded at its commit, in transient and
// persistent stores and after a reopen: a flipped byte or a truncated file
// fails with ErrChecksum instead of returning wrong data. A zero cluster
// whose slot lies past the end of the file reads as zeros, which is right.
func TestReadClusterVerifies(t *testing.T) {
	for _, tc := range []struct {
		name       string
		persistent bool
		reopen     bool
	}{
		{"transient", false, false},
		{"persistent", true, false},
		{"persistent reopened", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := vfstest.NewMemFS()
			f := openMem(t, fs, "store")
			opts := testOptions()
			opts.Persistent = tc.persistent
			s, err := Create(f, opts)
			if err != nil {
				t.Fatal(err)
			}
			const seed = 5
			commitClusters(t, s, seed, 3, 9, 11)
			if tc.reopen {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				if s, err = Open(openMem(t, fs, "store"), nil); err != nil {
					t.Fatal(err)
				}
			}
			verifyStore(t, s, seed, map[uint32]bool{3: true, 9: true, 11: true})

			// Flip one byte of cluster 9's slot (slot 1).
			f2 := openMem(t, fs, "store")
			off := s.geo.slotOff(1) + 100
			b := make([]byte, 1)
			f2.ReadAt(b, off)
			b[0] ^= 0x40
			f2.WriteAt(b, off)
			p := make([]byte, s.geo.clusterSize)
			for _, r := range []struct{ off, n int }{{0, len(p)}, {0, 10}, {200, 50}} {
				ok, err := s.ReadCluster(9, p[:r.n], r.off)
				if !ok || !errors.Is(err, ErrChecksum) {
					t.Fatalf("read of cluster 9 bytes %d+%d after a flipped byte: ok=%v err=%v, want ErrChecksum", r.off, r.n, ok, err)
				}
			}
			// The other clusters are intact and still read.
			if ok, err := s.ReadCluster(3, p[:10], 5); !ok || err != nil {
				t.Fatalf("read of intact cluster 3: %v %v", ok, err)
			}
			if !bytes.Equal(p[:10], clusterData(seed, 3, s.geo.clusterLen(3))[5:15]) {
				t.Fatal("partial read of cluster 3: wrong bytes")
			}

			// Truncated under the store: the cut clusters fail too.
			if err := f2.Truncate(s.geo.slotOff(0) + 10); err != nil {
				t.Fatal(err)
			}
			if ok, err := s.ReadCluster(11, p, 0); !ok || !errors.Is(err, ErrChecksum) {
				t.Fatalf("read of cluster 11 past the end of a truncated store: ok=%v err=%v, want ErrChecksum", ok, err)
			}
			s.Close()
		})
	}
}

// TestOffline: Identify, MarkInvalid and Wipe act only on the store whose
// UUID they are given, and leave any other file exactly as it was.
func TestOffline(t *testing.T) {
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.UUID = uuid.MustParse("6e627364-6e61-7073-8000-0000000000aa")
	s, err := Create(openMem(t, fs, "store"), opts)
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 4)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f := openMem(t, fs, "store")
	h, err := Identify(f)
	if err != nil || h.UUID != opts.UUID || h.Name != "snap" || h.State != StateValid {
		t.Fatalf("Identify = %+v, %v", h, err)
	}
	other := uuid.MustParse("6e627364-6e61-7073-8000-0000000000bb")
	before := fileBytes(t, fs, "store")
	if err := MarkInvalid(f, other, "x"); !errors.Is(err, ErrOtherStore) {
		t.Fatalf("MarkInvalid with another UUID: %v, want ErrOtherStore", err)
	}
	if err := Wipe(f, other); !errors.Is(err, ErrOtherStore) {
		t.Fatalf("Wipe with another UUID: %v, want ErrOtherStore", err)
	}
	if !bytes.Equal(before, fileBytes(t, fs, "store")) {
		t.Fatal("MarkInvalid or Wipe of another UUID changed the file")
	}

	if err := MarkInvalid(f, opts.UUID, "origin served without it"); err != nil {
		t.Fatal(err)
	}
	if err := MarkInvalid(f, opts.UUID, "second reason"); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(openMem(t, fs, "store"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h := s2.Header(); h.State != StateInvalid || h.Reason != "origin served without it" {
		t.Fatalf("after MarkInvalid, Open sees %v %q", h.State, h.Reason)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}

	if err := Wipe(f, opts.UUID); err != nil {
		t.Fatal(err)
	}
	if _, err := Identify(f); !errors.Is(err, ErrNotStore) {
		t.Fatalf("Identify after Wipe: %v, want ErrNotStore", err)
	}
	if _, err := Open(openMem(t, fs, "store"), nil); !errors.Is(err, ErrNotStore) {
		t.Fatalf("Open after Wipe: %v, want ErrNotStore", err)
	}
	if err := Wipe(f, opts.UUID); !errors.Is(err, ErrNotStore) {
		t.Fatalf("second Wipe: %v, want ErrNotStore", err)
	}

	// A file that is no store at all is left alone.
	plain := openMem(t, fs, "plain")
	plain.WriteAt(bytes.Repeat([]byte("user data "), 1000), 0)
	before = fileBytes(t, fs, "plain")
	if err := Wipe(plain, opts.UUID); !errors.Is(err, ErrNotStore) {
		t.Fatalf("Wipe of a plain file: %v, want ErrNotStore", err)
	}
	if err := MarkInvalid(plain, opts.UUID, "x"); !errors.Is(err, ErrNotStore) {
		t.Fatalf("MarkInvalid of a plain file: %v, want ErrNotStore", err)
	}
	if !bytes.Equal(before, fileBytes(t, fs, "plain")) {
		t.Fatal("Wipe or MarkInvalid changed a plain file")
	}
}

// TestWipeTornCreate: a Create torn by a crash after its first header slot
// leaves our header in slot 0 and the device's previous store in slot 1;
// Wipe (given our UUID) retires both.
func TestWipeTornCreate(t *testing.T) {
	fs := vfstest.NewMemFS()
	old := testOptions()
	old.UUID = uuid.MustParse("6e627364-6e61-7073-8000-0000000000cc")
	s, err := Create(openMem(t, fs, "dev"), old)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	mine := testOptions()
	mine.UUID = uuid.MustParse("6e627364-6e61-7073-8000-0000000000dd")
	s2, err := Create(openMem(t, fs, "mine"), mine)
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	// Slot 0 of "dev" from "mine": the torn state.
	slot := make([]byte, headerSize)
	openMem(t, fs, "mine").ReadAt(slot, 0)
	openMem(t, fs, "dev").WriteAt(slot, 0)
	f := openMem(t, fs, "dev")
	if _, err := Identify(f); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Identify of a torn create: %v, want ErrCorrupt", err)
	}
	if err := Wipe(f, mine.UUID); err != nil {
		t.Fatalf("Wipe of a torn create: %v", err)
	}
	if _, err := Identify(f); !errors.Is(err, ErrNotStore) {
		t.Fatalf("after Wipe: %v, want ErrNotStore", err)
	}
}

func fileBytes(t *testing.T, fs *vfstest.MemFS, name string) []byte {
	t.Helper()
	f := openMem(t, fs, name)
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil && size > 0 {
		t.Fatal(fmt.Errorf("read %s: %w", name, err))
	}
	return b
}

// TestOpenProvesDroppedBatchCommitted: after an unclean shutdown a newest
// batch that fails its checks was either in flight (its origin writes never
// issued) or committed and damaged since. Held against the origin, they
// differ: the engine rewrites an origin cluster only after the batch holding
// its copy was committed, so a dropped batch whose cluster the origin no
// longer holds was committed, and Open makes the store invalid instead of
// dropping it (which would serve the origin's new data as the snapshot's).
// A batch really in flight (the origin still holds its clusters) is dropped
// as before, and so is everything without an origin to hold it against.
func TestOpenProvesDroppedBatchCommitted(t *testing.T) {
	for _, tc := range []struct {
		name           string
		originWritten  bool // the engine rewrote cluster 9 after batch 2
		withOrigin     bool
		wantInvalid    bool
		wantClusters   int
		wantDroppedNow int
	}{
		{"committed then damaged", true, true, true, 2, 1},
		{"torn in flight", false, true, false, 2, 1},
		{"committed then damaged, no origin given", true, false, false, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := vfstest.NewMemFS()
			opts := testOptions()
			s, err := Create(openMem(t, fs, "store"), opts)
			if err != nil {
				t.Fatal(err)
			}
			const seed = 9
			// The origin holds, at each cluster, what the batches copy.
			origin := openMem(t, fs, "origin")
			for _, c := range []uint32{3, 4, 9} {
				origin.WriteAt(clusterData(seed, c, s.geo.clusterLen(c)), int64(c)*s.geo.clusterSize)
			}
			commitClusters(t, s, seed, 3, 4) // batch 1
			commitClusters(t, s, seed, 9)    // batch 2, the newest
			if tc.originWritten {
				origin.WriteAt(bytes.Repeat([]byte{0xee}, 100), 9*s.geo.clusterSize)
			}
			slot9, _ := s.idx.lookup(9)
			off := s.geo.slotOff(slot9) + 7
			s.crash()
			// Damage (or tear) batch 2's data.
			f := openMem(t, fs, "store")
			b := make([]byte, 1)
			f.ReadAt(b, off)
			b[0] ^= 1
			f.WriteAt(b, off)

			var o io.ReaderAt
			if tc.withOrigin {
				o = openMem(t, fs, "origin")
			}
			s2, err := Open(openMem(t, fs, "store"), o)
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			h, rec := s2.Header(), s2.Recovery()
			if got := h.State == StateInvalid; got != tc.wantInvalid {
				t.Fatalf("store invalid = %v (%q), want %v", got, h.Reason, tc.wantInvalid)
			}
			if tc.wantInvalid && (!strings.HasPrefix(h.Reason, "store corrupt: batch 2") || !strings.Contains(h.Reason, "origin cluster 9") || rec.Corrupt != h.Reason) {
				t.Fatalf("reason %q, recovery %q: want it to name batch 2 and cluster 9", h.Reason, rec.Corrupt)
			}
			if rec.Clusters != tc.wantClusters || rec.DroppedClusters() != tc.wantDroppedNow {
				t.Fatalf("recovered %d clusters, dropped %d; want %d, %d", rec.Clusters, rec.DroppedClusters(), tc.wantClusters, tc.wantDroppedNow)
			}
			if d := rec.Dropped[0]; len(d.Entries) != 1 || d.Entries[0].Cluster != 9 {
				t.Fatalf("dropped batch entries %+v, want cluster 9", d.Entries)
			}
		})
	}
}

// TestOpenOriginUnreadable: an origin that cannot be read to verify a
// dropped batch fails Open, before anything is written, so that the next
// Open checks again (a later Open would take the batch for a leftover).
func TestOpenOriginUnreadable(t *testing.T) {
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "store"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 5)
	slot, _ := s.idx.lookup(5)
	off := s.geo.slotOff(slot)
	s.crash()
	f := openMem(t, fs, "store")
	f.WriteAt([]byte{0xff, 0xfe}, off)
	before := fileBytes(t, fs, "store")
	if _, err := Open(openMem(t, fs, "store"), bytes.NewReader(nil)); err == nil || !strings.Contains(err.Error(), "read origin cluster 5") {
		t.Fatalf("Open with an unreadable origin: %v", err)
	}
	if !bytes.Equal(before, fileBytes(t, fs, "store")) {
		t.Fatal("a failed Open wrote to the store")
	}
}

// TestPartialReadsByBlock: once a partial read has checked a whole
// cluster, later partial reads of it read and check only the 4 KiB blocks
// they return: a byte damaged in a block read is caught (naming the bytes),
// one in a block not read does not fail a read that does not return it, and
// a cluster evicted from the block sums is checked whole again.
func TestPartialReadsByBlock(t *testing.T) {
	fs := vfstest.NewMemFS()
	opts := testOptions()
	opts.ClusterSize = 64 << 10
	opts.OriginSize = 1<<20 + 5000 // a short last cluster: 16, 5000 bytes
	s, err := Create(openMem(t, fs, "store"), opts)
	if err != nil {
		t.Fatal(err)
	}
	const seed = 3
	commitClusters(t, s, seed, 2, 16)
	want2 := clusterData(seed, 2, s.geo.clusterLen(2))
	read := func(c uint32, off, n int) ([]byte, error) {
		p := make([]byte, n)
		ok, err := s.ReadCluster(c, p, off)
		if !ok {
			t.Fatalf("cluster %d not in the store", c)
		}
		return p, err
	}
	if p, err := read(2, 5000, 3000); err != nil || !bytes.Equal(p, want2[5000:8000]) {
		t.Fatalf("first partial read: %v", err)
	}
	if s.blockSums.get(2) == nil {
		t.Fatal("a partial read that checked the whole cluster kept no block sums")
	}
	slot, _ := s.idx.lookup(2)
	f := openMem(t, fs, "store")
	flip := func(off int64) {
		b := make([]byte, 1)
		f.ReadAt(b, s.geo.slotOff(slot)+off)
		b[0] ^= 0x10
		f.WriteAt(b, s.geo.slotOff(slot)+off)
	}
	flip(40000) // block 9
	if p, err := read(2, 100, 4000); err != nil || !bytes.Equal(p, want2[100:4100]) {
		t.Fatalf("read of an intact block after damage elsewhere: %v", err)
	}
	if _, err := read(2, 36000, 8000); !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), "bytes 36864…40959") {
		t.Fatalf("read of the damaged block: %v; want ErrChecksum naming bytes 36864…40959", err)
	}
	if _, err := read(2, 0, len(want2)); !errors.Is(err, ErrChecksum) {
		t.Fatalf("whole read of the damaged cluster: %v", err)
	}
	// The short last cluster reads by blocks too.
	want16 := clusterData(seed, 16, s.geo.clusterLen(16))
	for _, r := range [][2]int{{10, 20}, {4090, 900}, {4096, 904}} {
		if p, err := read(16, r[0], r[1]); err != nil || !bytes.Equal(p, want16[r[0]:r[0]+r[1]]) {
			t.Fatalf("partial read %v of the short cluster: %v", r, err)
		}
	}
}

// TestBlockSumsBounded: the block sums keep at most blockSumsMax clusters,
// evicting the oldest.
func TestBlockSumsBounded(t *testing.T) {
	var b blockSums
	data := make([]byte, 2*sumBlock)
	for c := uint32(0); c < blockSumsMax+10; c++ {
		b.add(c, data)
	}
	if len(b.sums) != blockSumsMax || len(b.ring) != blockSumsMax {
		t.Fatalf("%d clusters kept, ring %d; want %d", len(b.sums), len(b.ring), blockSumsMax)
	}
	for c := uint32(0); c < 10; c++ {
		if b.get(c) != nil {
			t.Fatalf("cluster %d, among the oldest, not evicted", c)
		}
	}
	if s := b.get(blockSumsMax + 9); len(s) != 2 || s[0] != checksum(data[:sumBlock]) {
		t.Fatalf("newest cluster's sums %v", s)
	}
}
