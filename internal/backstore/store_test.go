package backstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// clusterData is the content the tests give cluster c: distinct per
// cluster and per seed, so a cluster found in the wrong slot shows.
func clusterData(seed uint64, c uint32, n int64) []byte {
	// splitmix64 from (seed, c): cheap, which matters under -race.
	x := seed*0x9e3779b97f4a7c15 ^ uint64(c)<<32 ^ uint64(c)
	p := make([]byte, (n+7)&^7)
	for i := 0; i < len(p); i += 8 {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		binary.LittleEndian.PutUint64(p[i:], z^z>>31)
	}
	return p[:n]
}

func openMem(t testing.TB, fs *vfstest.MemFS, name string) vfs.File {
	t.Helper()
	f, err := fs.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func testOptions() Options {
	return Options{Name: "snap", ClusterSize: 512, OriginSize: 3000 * 512, OriginID: "origin-1", Persistent: true,
		Created: time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)}
}

// commitClusters commits clusters cs (data from clusterData) as one batch.
func commitClusters(t testing.TB, s *Store, seed uint64, cs ...uint32) {
	t.Helper()
	if err := s.Commit(makeBatch(s, seed, cs...)); err != nil {
		t.Fatalf("commit of %d clusters: %v", len(cs), err)
	}
}

func makeBatch(s *Store, seed uint64, cs ...uint32) []Cluster {
	batch := make([]Cluster, len(cs))
	for i, c := range cs {
		batch[i] = Cluster{Index: c, Data: clusterData(seed, c, s.geo.clusterLen(c))}
	}
	return batch
}

// verifyStore checks that s holds exactly want, each with its data.
func verifyStore(t testing.TB, s *Store, seed uint64, want map[uint32]bool) {
	t.Helper()
	if got := s.CopiedCount(); got != len(want) {
		t.Fatalf("store holds %d clusters, want %d", got, len(want))
	}
	var n int
	s.ForEachCopied(func(c uint32) {
		n++
		if !want[c] {
			t.Fatalf("store holds cluster %d, which was never committed", c)
		}
	})
	if n != len(want) {
		t.Fatalf("ForEachCopied visited %d, want %d", n, len(want))
	}
	for c := range want {
		l := s.geo.clusterLen(c)
		p := make([]byte, l)
		ok, err := s.ReadCluster(c, p, 0)
		if err != nil || !ok {
			t.Fatalf("ReadCluster(%d) = %v, %v", c, ok, err)
		}
		if !bytes.Equal(p, clusterData(seed, c, l)) {
			t.Fatalf("cluster %d: wrong data", c)
		}
	}
}

func TestCommitReopen(t *testing.T) {
	for _, persistent := range []bool{true, false} {
		t.Run(fmt.Sprintf("persistent=%v", persistent), func(t *testing.T) {
			fs := vfstest.NewMemFS()
			opts := testOptions()
			opts.Persistent = persistent
			opts.OriginSize = 2999*512 + 100 // partial last cluster 2999
			s, err := Create(openMem(t, fs, "s"), opts)
			if err != nil {
				t.Fatal(err)
			}
			want := map[uint32]bool{}
			r := rand.New(rand.NewPCG(1, 2))
			perm := r.Perm(3000)
			i := 0
			for i < len(perm) {
				n := min(1+r.IntN(700), len(perm)-i) // batches spanning several blocks too
				var cs []uint32
				for _, c := range perm[i : i+n] {
					cs = append(cs, uint32(c))
					want[uint32(c)] = true
				}
				commitClusters(t, s, 9, cs...)
				i += n
				if i > 2000 {
					break
				}
			}
			verifyStore(t, s, 9, want)
			if ok, _ := s.ReadCluster(uint32(perm[2999]), make([]byte, 1), 0); ok {
				t.Error("ReadCluster found an uncopied cluster")
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			_, err = Open(openMem(t, fs, "s"), nil)
			if !persistent {
				if !errors.Is(err, ErrTransient) {
					t.Fatalf("Open of a transient store: %v, want ErrTransient", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			s2, _ := Open(openMem(t, fs, "s"), nil)
			verifyStore(t, s2, 9, want)
			h := s2.Header()
			if h.Name != opts.Name || h.OriginID != opts.OriginID || h.OriginSize != opts.OriginSize ||
				h.ClusterSize != 512 || !h.Created.Equal(opts.Created) || !h.Persistent || h.State != StateValid {
				t.Errorf("header after reopen: %+v", h)
			}
			// The reopened store takes more batches, and a third open sees them.
			var more []uint32
			for _, c := range perm[i : i+300] {
				more = append(more, uint32(c))
				want[uint32(c)] = true
			}
			commitClusters(t, s2, 9, more...)
			s2.Close()
			s3, err := Open(openMem(t, fs, "s"), nil)
			if err != nil {
				t.Fatal(err)
			}
			verifyStore(t, s3, 9, want)
			if rep, err := Check(openMem(t, fs, "s")); err != nil || rep.Clusters != len(want) || rep.DataVerified != len(want) {
				t.Fatalf("Check: %+v, %v", rep, err)
			}
		})
	}
}

// crash ends s the way a crash would after every write reached the disk:
// the file is closed without the clean mark.
func (s *Store) crash() {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.f.Close()
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed)) }

// TestZeroClusterPastEOF: a crash can lose the data write of a last batch
// whose clusters are all zeros while its metadata survives; the file then
// ends before those slots. Their checksums match zeros, so recovery keeps
// the batch, and ReadCluster must return the zeros, not an EOF error.
func TestZeroClusterPastEOF(t *testing.T) {
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "store"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 7)
	zero := make([]byte, s.geo.clusterLen(9))
	if err := s.Commit([]Cluster{{Index: 9, Data: zero}}); err != nil {
		t.Fatal(err)
	}
	slot9, _ := s.idx.lookup(9)
	end := s.geo.slotOff(slot9)
	s.crash()

	f := openMem(t, fs, "store")
	if err := f.Truncate(end); err != nil { // the zeros never reached the file
		t.Fatal(err)
	}
	s, err = Open(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p := bytes.Repeat([]byte{0xAA}, len(zero))
	ok, err := s.ReadCluster(9, p, 0)
	if !ok || err != nil {
		t.Fatalf("ReadCluster(9) past the end of the file: ok=%v err=%v, want the zero cluster", ok, err)
	}
	if !bytes.Equal(p, zero) {
		t.Errorf("ReadCluster(9) past the end of the file returned non-zero bytes")
	}
	if got := s.CopiedCount(); got != 2 {
		t.Errorf("recovered %d clusters, want 2 (7 and the zero cluster 9)", got)
	}
}
