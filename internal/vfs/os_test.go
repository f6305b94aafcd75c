package vfs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestOSFile drives the OS implementation through the File interface and
// its optional extensions on a regular file: what the engine relies on is
// that a deallocated or zeroed range reads back as zeros, the size is kept,
// and Remove makes the file go away.
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

	if err := f.Truncate(4096); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Size(); n != 4096 {
		t.Errorf("Size after Truncate(4096) = %d", n)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
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
}
