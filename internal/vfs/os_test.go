package vfs

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestOSFile drives the OS implementation through the File interface and
// its optional extensions on a regular file: what the engine relies on is
// that a deallocated or zeroed range reads back as zeros, the size is kept,
// write-behind is accepted, and Remove makes the file go away.
func TestOSFile(t *testing.T) {
	name := filepath.Join(t.TempDir(), "f")
	f, err := OS{}.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 10
	data := bytes.Repeat([]byte{0xA5}, size)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if n, err := f.Size(); err != nil || n != size {
		t.Fatalf("Size = %d, %v; want %d", n, err, size)
	}

	for _, tc := range []struct {
		name string
		op   func(off, n int64) error
	}{
		{"Deallocate", f.(Deallocator).Deallocate},
		{"ZeroRange", f.(Zeroer).ZeroRange},
	} {
		if _, err := f.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		if err := tc.op(4096, 8192); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := make([]byte, size)
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(data)
		clear(want[4096 : 4096+8192])
		if !bytes.Equal(got, want) {
			t.Errorf("%s(4096, 8192): range not zero or neighbours changed", tc.name)
		}
		if n, _ := f.Size(); n != size {
			t.Errorf("%s changed the size to %d", tc.name, n)
		}
	}

	// Write-behind is a hint: accepted, and what reads back is unchanged.
	before := make([]byte, size)
	if _, err := f.ReadAt(before, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.(WriteBehinder).StartWriteback(0, size); err != nil {
		t.Fatalf("StartWriteback: %v", err)
	}
	after := make([]byte, size)
	if _, err := f.ReadAt(after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Error("StartWriteback changed the file's contents")
	}

	if err := f.Truncate(4096); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != 4096 {
		t.Errorf("Size after Truncate(4096) = %d", n)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.(WriteBehinder).StartWriteback(0, 4096); err == nil {
		t.Error("StartWriteback of a closed file succeeded")
	}
	if err := (OS{}).Remove(name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file still there after Remove: %v", err)
	}
}

// TestOSOpenMissing: opening a missing file without O_CREATE fails with an
// error that says so, and creates nothing.
func TestOSOpenMissing(t *testing.T) {
	name := filepath.Join(t.TempDir(), "missing")
	if _, err := (OS{}).OpenFile(name, os.O_RDWR, 0); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenFile of a missing file: %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("OpenFile without O_CREATE created %s", name)
	}
}

// TestOSBlockDevice: on a block device (a loop device here) Size comes from
// BLKGETSIZE64, Deallocate and ZeroRange zero through BLKZEROOUT, and
// Truncate is refused.
func TestOSBlockDevice(t *testing.T) {
	testenv.RequireRoot(t)
	losetup := testenv.RequireTool(t, "losetup")
	img := filepath.Join(t.TempDir(), "img")
	const size = 1 << 20
	if err := os.WriteFile(img, bytes.Repeat([]byte{0x5A}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		if testenv.Strict() {
			t.Fatalf("losetup: %v: %s", err, out)
		}
		t.Skipf("SKIP: no loop device: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })

	f, err := OS{}.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := f.Size(); err != nil || n != size {
		t.Fatalf("Size = %d, %v; want %d", n, err, size)
	}
	if err := f.Truncate(4096); err == nil {
		t.Error("Truncate of a block device succeeded")
	}
	if err := f.(Deallocator).Deallocate(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.(Zeroer).ZeroRange(8192, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3*4096)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x5A}, 3*4096)
	clear(want[:4096])
	clear(want[8192:])
	if !bytes.Equal(got, want) {
		t.Error("BLKZEROOUT ranges do not read back as zeros, or their neighbour changed")
	}
	if err := f.(WriteBehinder).StartWriteback(0, size); err != nil {
		t.Errorf("StartWriteback on a block device: %v", err)
	}
	// A block device does not tell holes: callers take it all for data.
	ds := f.(DataSeeker)
	if _, err := ds.SeekData(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("SeekData on a block device: %v, want ErrUnsupported", err)
	}
	if _, err := ds.SeekHole(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("SeekHole on a block device: %v, want ErrUnsupported", err)
	}
}

// TestOSFileSeekData: SEEK_DATA and SEEK_HOLE on a regular file find the
// data written, the holes never written and the hole punched, on the file
// system of the test's temporary directory and on tmpfs.
func TestOSFileSeekData(t *testing.T) {
	dirs := []string{t.TempDir()}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "vfs-seek")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		dirs = append(dirs, d)
	}
	const k = 1 << 10
	for _, dir := range dirs {
		f, err := OS{}.OpenFile(filepath.Join(dir, "sparse"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		const size = 1 << 20
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		for _, r := range [][2]int64{{64 * k, 128 * k}, {512 * k, 516 * k}} {
			if _, err := f.WriteAt(bytes.Repeat([]byte{0xA5}, int(r[1]-r[0])), r[0]); err != nil {
				t.Fatal(err)
			}
		}
		// Zeros written are data; a punched range is a hole.
		if _, err := f.WriteAt(make([]byte, 4*k), 256*k); err != nil {
			t.Fatal(err)
		}
		if err := f.(Deallocator).Deallocate(96*k, 4*k); err != nil {
			t.Fatal(err)
		}
		ds := f.(DataSeeker)
		// Walk the file as a map: data, then the next hole, and so on.
		var got [][2]int64
		for pos := int64(0); ; {
			d, err := ds.SeekData(pos)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			h, err := ds.SeekHole(d)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, [2]int64{d, h})
			pos = h
			if pos >= size {
				break
			}
		}
		want := [][2]int64{{64 * k, 96 * k}, {100 * k, 128 * k}, {256 * k, 260 * k}, {512 * k, 516 * k}}
		if !slices.Equal(got, want) {
			t.Errorf("%s: data %v, want %v", dir, got, want)
		}
		if n, err := ds.SeekHole(70 * k); err != nil || n != 96*k {
			t.Errorf("%s: SeekHole inside data = %d, %v; want %d", dir, n, err, 96*k)
		}
		if n, err := ds.SeekData(70 * k); err != nil || n != 70*k {
			t.Errorf("%s: SeekData inside data = %d, %v; want %d", dir, n, err, 70*k)
		}
		if n, err := ds.SeekHole(900 * k); err != nil || n != 900*k {
			t.Errorf("%s: SeekHole inside a hole = %d, %v; want %d", dir, n, err, 900*k)
		}
		for _, off := range []int64{600 * k, size, size + 1} {
			if _, err := ds.SeekData(off); !errors.Is(err, io.EOF) {
				t.Errorf("%s: SeekData(%d) after the last data: %v, want io.EOF", dir, off, err)
			}
		}
	}
}
