package vfstest

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// dataMap walks f with SeekData and SeekHole and returns its data ranges.
func dataMap(t *testing.T, f vfs.File) [][2]int64 {
	t.Helper()
	ds := f.(vfs.DataSeeker)
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	var m [][2]int64
	for pos := int64(0); pos < size; {
		d, err := ds.SeekData(pos)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SeekData(%d): %v", pos, err)
		}
		h, err := ds.SeekHole(d)
		if err != nil {
			t.Fatalf("SeekHole(%d): %v", d, err)
		}
		m = append(m, [2]int64{d, h})
		pos = h
	}
	return m
}

func TestMemFSSeekData(t *testing.T) {
	fs := NewMemFS()
	f := mustOpen(t, fs, "f", os.O_RDWR|os.O_CREATE)
	if err := f.Truncate(64 << 10); err != nil {
		t.Fatal(err)
	}
	if m := dataMap(t, f); len(m) != 0 {
		t.Errorf("new sparse file: data %v", m)
	}
	mustWrite(t, f, []byte{1}, 5000)              // block 4096
	mustWrite(t, f, make([]byte, 4096), 16384)    // zeros: a hole here
	mustWrite(t, f, []byte{2, 0, 0, 0, 3}, 32766) // blocks 28672 and 32768
	if err := f.(vfs.Deallocator).Deallocate(28672, 4096); err != nil {
		t.Fatal(err)
	}
	want := [][2]int64{{4096, 8192}, {32768, 36864}}
	if m := dataMap(t, f); !slices.Equal(m, want) {
		t.Errorf("data %v, want %v", m, want)
	}
	ds := f.(vfs.DataSeeker)
	if n, err := ds.SeekData(5000); err != nil || n != 5000 {
		t.Errorf("SeekData inside data = %d, %v", n, err)
	}
	if n, err := ds.SeekHole(100); err != nil || n != 100 {
		t.Errorf("SeekHole inside a hole = %d, %v", n, err)
	}
	if _, err := ds.SeekData(40000); !errors.Is(err, io.EOF) {
		t.Errorf("SeekData after the last data: %v, want io.EOF", err)
	}
	if _, err := ds.SeekHole(64 << 10); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SeekHole at the end: %v, want ENXIO", err)
	}
	// A partial last block of data: the end of the file is the hole.
	if err := f.Truncate(36864 + 100); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, []byte{9}, 36864+50)
	if n, err := ds.SeekHole(36864); err != nil || n != 36964 {
		t.Errorf("SeekHole in the partial last block = %d, %v; want 36964", n, err)
	}
	// A device tells nothing.
	if err := fs.CreateDevice("dev", 1<<20); err != nil {
		t.Fatal(err)
	}
	dev := mustOpen(t, fs, "dev", os.O_RDWR)
	if _, err := dev.(vfs.DataSeeker).SeekData(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("SeekData on a device: %v, want ErrUnsupported", err)
	}
}

// With block-aligned writes of data that is never all zeros and
// block-aligned punches, a MemFS file maps as a real one does (tmpfs, whose
// holes are pages).
func TestMemFSSeekDataMatchesOS(t *testing.T) {
	dir := "/dev/shm"
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Skip("no /dev/shm")
	}
	d, err := os.MkdirTemp(dir, "vfstest-seek")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0))
	mem := mustOpen(t, NewMemFS(), "f", os.O_RDWR|os.O_CREATE)
	real := mustOpen(t, vfs.OS{}, filepath.Join(d, "f"), os.O_RDWR|os.O_CREATE)
	defer real.Close()
	const blocks = 64
	for _, f := range []vfs.File{mem, real} {
		if err := f.Truncate(blocks * HoleBlock); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 300; i++ {
		off := r.Int64N(blocks) * HoleBlock
		n := min(r.Int64N(4)+1, blocks-off/HoleBlock) * HoleBlock
		if r.IntN(2) == 0 {
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(r.Uint32()) | 1
			}
			mustWrite(t, mem, p, off)
			mustWrite(t, real, p, off)
		} else {
			for _, f := range []vfs.File{mem, real} {
				if err := f.(vfs.Deallocator).Deallocate(off, n); err != nil {
					t.Fatal(err)
				}
			}
		}
		if mm, mr := dataMap(t, mem), dataMap(t, real); !slices.Equal(mm, mr) {
			t.Fatalf("op %d: mem %v, os %v", i, mm, mr)
		}
	}
}
