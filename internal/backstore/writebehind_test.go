package backstore

import (
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// behindFile records the ranges written and the write-behind hints, in
// order; with fail, every hint fails.
type behindFile struct {
	vfs.File
	written [][2]int64 // [off, end) of each WriteAt
	hints   [][2]int64 // [off, end) of each StartWriteback
	fail    bool
}

func (f *behindFile) WriteAt(p []byte, off int64) (int, error) {
	f.written = append(f.written, [2]int64{off, off + int64(len(p))})
	return f.File.WriteAt(p, off)
}

func (f *behindFile) StartWriteback(off, length int64) error {
	f.hints = append(f.hints, [2]int64{off, off + length})
	if f.fail {
		return syscall.EINVAL
	}
	return nil
}

// writtenBefore reports whether every byte of [off, end) was written before
// now.
func (f *behindFile) writtenBefore(off, end int64) bool {
	for off < end {
		next := off
		for _, w := range f.written {
			if w[0] <= off && off < w[1] {
				next = max(next, w[1])
			}
		}
		if next == off {
			return false
		}
		off = next
	}
	return true
}

// TestWriteBehind: a persistent store hands each Commit's data to
// write-behind once written, in pieces of writeBehindBytes and then the
// rest, covering the batch's data slots exactly; a transient store does
// not; a file whose write-behind fails is asked once and the store works on.
func TestWriteBehind(t *testing.T) {
	const seed = 7
	perPiece := writeBehindBytes / 512 // testOptions' clusters
	big := make([]uint32, perPiece+perPiece/2)
	for i := range big {
		big[i] = uint32(i)
	}
	small := []uint32{5000, 5001, 5002}
	options := func(persistent bool) Options {
		o := testOptions()
		o.OriginSize = 8192 * 512
		o.Persistent = persistent
		return o
	}

	t.Run("persistent", func(t *testing.T) {
		f := &behindFile{File: openMem(t, vfstest.NewMemFS(), "store")}
		s, err := Create(f, options(true))
		if err != nil {
			t.Fatal(err)
		}
		var checked int
		check := func(first, total uint32, wantHints int) {
			t.Helper()
			hints := f.hints[checked:]
			checked = len(f.hints)
			if len(hints) != wantHints {
				t.Fatalf("%d hints for slots %d…%d, want %d: %v", len(hints), first, total-1, wantHints, hints)
			}
			at := s.geo.slotOff(first)
			for _, h := range hints {
				if h[0] != at || h[1]-h[0] > writeBehindBytes {
					t.Fatalf("hint %v: want one starting at %d of at most %d bytes", h, at, writeBehindBytes)
				}
				if !f.writtenBefore(h[0], h[1]) {
					t.Fatalf("hint %v covers bytes not written yet", h)
				}
				at = h[1]
			}
			if at != s.geo.slotOff(total) {
				t.Fatalf("hints end at %d, the batch's data at %d", at, s.geo.slotOff(total))
			}
		}
		commitClusters(t, s, seed, big...)
		check(0, uint32(len(big)), 2)
		commitClusters(t, s, seed, small...)
		check(uint32(len(big)), uint32(len(big)+len(small)), 1)
	})

	t.Run("transient", func(t *testing.T) {
		f := &behindFile{File: openMem(t, vfstest.NewMemFS(), "store")}
		s, err := Create(f, options(false))
		if err != nil {
			t.Fatal(err)
		}
		commitClusters(t, s, seed, big...)
		if len(f.hints) != 0 {
			t.Fatalf("a transient store asked for write-behind: %v", f.hints)
		}
	})

	t.Run("failing", func(t *testing.T) {
		fs := vfstest.NewMemFS()
		f := &behindFile{File: openMem(t, fs, "store"), fail: true}
		s, err := Create(f, options(true))
		if err != nil {
			t.Fatal(err)
		}
		commitClusters(t, s, seed, big...)
		commitClusters(t, s, seed, small...)
		if len(f.hints) != 1 {
			t.Fatalf("write-behind failed and was asked %d times, want once", len(f.hints))
		}
		// What a crash now leaves: the Commits' syncs made it durable.
		s2, err := Open(openMem(t, fs.CrashClone(vfstest.CrashOptions{}), "store"), nil)
		if err != nil {
			t.Fatal(err)
		}
		want := map[uint32]bool{}
		for _, c := range append(big, small...) {
			want[c] = true
		}
		verifyStore(t, s2, seed, want)
	})
}
