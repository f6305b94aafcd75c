package vfstest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

func mustOpen(t *testing.T, fs vfs.FS, name string, flag int) vfs.File {
	t.Helper()
	f, err := fs.OpenFile(name, flag, 0o644)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return f
}

func mustWrite(t *testing.T, f vfs.File, p []byte, off int64) {
	t.Helper()
	if n, err := f.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

func contents(t *testing.T, fs *MemFS, name string) []byte {
	t.Helper()
	b, err := fs.Contents(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMemFSMatchesOS runs the same random operations on a MemFS file and on a
// real file and compares every read, so MemFS's semantics (sparse growth,
// short reads, hole punching keeping the size) are those of the kernel's.
func TestMemFSMatchesOS(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0))
	mem := mustOpen(t, NewMemFS(), "f", os.O_RDWR|os.O_CREATE)
	real := mustOpen(t, vfs.OS{}, filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE)
	defer real.Close()
	const span = 64 << 10
	for i := 0; i < 2000; i++ {
		off := r.Int64N(span)
		n := r.Int64N(8<<10) + 1
		var what string
		var errM, errR error
		switch r.IntN(6) {
		case 0, 1:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(r.Uint32())
			}
			what = "write"
			_, errM = mem.WriteAt(p, off)
			_, errR = real.WriteAt(p, off)
		case 2:
			what = "truncate"
			errM, errR = mem.Truncate(off), real.Truncate(off)
		case 3:
			what = "deallocate"
			// Punch-hole granularity on a real file system is a block;
			// align so both sides zero the same bytes.
			off, n = off&^4095, (n+4095)&^4095
			errM = mem.(vfs.Deallocator).Deallocate(off, n)
			errR = real.(vfs.Deallocator).Deallocate(off, n)
		case 4:
			what = "zero"
			off, n = off&^4095, (n+4095)&^4095
			errM = mem.(vfs.Zeroer).ZeroRange(off, n)
			errR = real.(vfs.Zeroer).ZeroRange(off, n)
			if errors.Is(errR, syscall.EOPNOTSUPP) {
				continue // tmpfs has no ZERO_RANGE; nothing to compare
			}
		case 5:
			what = "sync"
			errM, errR = mem.Sync(), real.Sync()
		}
		if errM != nil || errR != nil {
			t.Fatalf("op %d %s off=%d n=%d: mem %v, os %v", i, what, off, n, errM, errR)
		}
		sm, _ := mem.Size()
		sr, _ := real.Size()
		if sm != sr {
			t.Fatalf("op %d %s: size mem %d, os %d", i, what, sm, sr)
		}
		ro, rn := r.Int64N(span+4096), r.IntN(8<<10)+1
		bm, br := make([]byte, rn), make([]byte, rn)
		nm, em := mem.ReadAt(bm, ro)
		nr, er := real.ReadAt(br, ro)
		if nm != nr || (em == nil) != (er == nil) || !bytes.Equal(bm[:nm], br[:nr]) {
			t.Fatalf("op %d %s: ReadAt(%d, %d): mem %d,%v os %d,%v", i, what, rn, ro, nm, em, nr, er)
		}
		if em != nil && em != io.EOF {
			t.Fatalf("read error %v", em)
		}
	}
}

func TestCrashCloneKeepsOnlySynced(t *testing.T) {
	fs := NewMemFS()
	f := mustOpen(t, fs, "a", os.O_RDWR|os.O_CREATE)
	mustWrite(t, f, []byte("hello"), 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, f, []byte("J"), 0)
	mustWrite(t, f, []byte(" world"), 5)
	// A file created and never written survives, empty; a removed one does not.
	mustOpen(t, fs, "empty", os.O_RDWR|os.O_CREATE)
	mustOpen(t, fs, "gone", os.O_RDWR|os.O_CREATE)
	if err := fs.Remove("gone"); err != nil {
		t.Fatal(err)
	}

	c := fs.CrashClone(CrashOptions{})
	if got := contents(t, c, "a"); string(got) != "hello" {
		t.Errorf("crash kept %q, want the synced %q", got, "hello")
	}
	if got := fmt.Sprint(c.Names()); got != "[a empty]" {
		t.Errorf("files after crash %s, want [a empty]", got)
	}
	if got := contents(t, fs, "a"); string(got) != "Jello world" {
		t.Errorf("original changed by the clone: %q", got)
	}
	// The clone is a working MemFS whose state is all durable.
	cf := mustOpen(t, c, "a", os.O_RDWR)
	mustWrite(t, cf, []byte("X"), 0)
	if got := contents(t, c.CrashClone(CrashOptions{}), "a"); string(got) != "hello" {
		t.Errorf("second-generation crash kept %q", got)
	}
}

func TestCrashCloneUnsyncedSubset(t *testing.T) {
	// Eight unsynced one-byte writes to distinct offsets: over many seeds
	// each must be seen kept and dropped, never anything else.
	fs := NewMemFS()
	f := mustOpen(t, fs, "a", os.O_RDWR|os.O_CREATE)
	mustWrite(t, f, bytes.Repeat([]byte{'.'}, 8), 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		mustWrite(t, f, []byte{byte('0' + i)}, int64(i))
	}
	var kept, dropped [8]int
	for seed := uint64(0); seed < 200; seed++ {
		c := fs.CrashClone(CrashOptions{Rand: rand.New(rand.NewPCG(seed, 1))})
		got := contents(t, c, "a")
		again := contents(t, fs.CrashClone(CrashOptions{Rand: rand.New(rand.NewPCG(seed, 1))}), "a")
		if !bytes.Equal(got, again) {
			t.Fatalf("seed %d: clone not replayable: %q vs %q", seed, got, again)
		}
		for i, b := range got {
			switch b {
			case '.':
				dropped[i]++
			case byte('0' + i):
				kept[i]++
			default:
				t.Fatalf("seed %d: byte %d is %q", seed, i, b)
			}
		}
	}
	for i := range kept {
		if kept[i] == 0 || dropped[i] == 0 {
			t.Errorf("write %d kept %d, dropped %d times in 200 crashes", i, kept[i], dropped[i])
		}
	}
}

func TestCrashCloneTornWrites(t *testing.T) {
	fs := NewMemFS()
	f := mustOpen(t, fs, "a", os.O_RDWR|os.O_CREATE)
	mustWrite(t, f, make([]byte, 4096), 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	// One write covering sectors 0..7 partially at both ends.
	mustWrite(t, f, bytes.Repeat([]byte{1}, 4096-200), 100)
	torn := false
	for seed := uint64(0); seed < 50; seed++ {
		c := fs.CrashClone(CrashOptions{Rand: rand.New(rand.NewPCG(seed, 2)), KeepProbability: 0.99, TornWrites: true, SectorSize: 512})
		got := contents(t, c, "a")
		if got[0] != 0 || got[99] != 0 || got[4095-99] != 0 {
			t.Fatalf("seed %d: bytes outside the write changed", seed)
		}
		// Within each sector the write is all or nothing.
		var ones int
		for s := 0; s < 8; s++ {
			lo, hi := max(100, s*512), min(4096-100, (s+1)*512)
			sec := got[lo:hi]
			if !bytes.Equal(sec, bytes.Repeat(sec[:1], len(sec))) {
				t.Fatalf("seed %d: sector %d torn inside: %v", seed, s, sec)
			}
			ones += int(sec[0])
		}
		if ones > 0 && ones < 8 {
			torn = true
		}
	}
	if !torn {
		t.Error("50 crashes never tore the write at a sector boundary")
	}
}

func TestCrashAt(t *testing.T) {
	// Write i (1-based) writes byte i at offset i-1, with a Sync after
	// every third write. Crashing before mutating op k keeps exactly what
	// the last Sync before k covered.
	for k := int64(1); ; k++ {
		fs := NewMemFS()
		fs.CrashAt(k, CrashOptions{})
		f := mustOpen(t, fs, "a", os.O_RDWR|os.O_CREATE)
		var synced []byte // what the last Sync before the crash point made durable
		var written []byte
		for i := 1; i <= 9; i++ {
			mustWrite(t, f, []byte{byte(i)}, int64(i-1))
			written = append(written, byte(i))
			if i%3 == 0 {
				if fs.Crashed() != nil {
					break
				}
				if err := f.Sync(); err != nil {
					t.Fatal(err)
				}
				if fs.Crashed() == nil {
					synced = append([]byte(nil), written...)
				}
			}
		}
		c := fs.Crashed()
		if c == nil {
			if k <= fs.MutationCount() {
				t.Fatalf("k=%d: no clone, but %d mutations ran", k, fs.MutationCount())
			}
			if k < 12 {
				t.Fatalf("loop ended at k=%d, want 12 (9 writes + 3 syncs)", k)
			}
			return
		}
		if got := contents(t, c, "a"); !bytes.Equal(got, synced) {
			t.Fatalf("k=%d: crash kept %v, want %v", k, got, synced)
		}
	}
}

func TestMemFSOpenFlagsAndErrors(t *testing.T) {
	fs := NewMemFS()
	if _, err := fs.OpenFile("x", os.O_RDWR, 0); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open missing: %v, want ErrNotExist", err)
	}
	f := mustOpen(t, fs, "x", os.O_RDWR|os.O_CREATE|os.O_EXCL)
	mustWrite(t, f, []byte("abc"), 0)
	if _, err := fs.OpenFile("x", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0); !errors.Is(err, os.ErrExist) {
		t.Errorf("O_EXCL on existing: %v, want ErrExist", err)
	}
	ro := mustOpen(t, fs, "x", os.O_RDONLY)
	if _, err := ro.WriteAt([]byte("z"), 0); !errors.Is(err, syscall.EBADF) {
		t.Errorf("write on read-only handle: %v, want EBADF", err)
	}
	tr := mustOpen(t, fs, "x", os.O_RDWR|os.O_TRUNC)
	if n, _ := tr.Size(); n != 0 {
		t.Errorf("size after O_TRUNC %d", n)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 1), 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("read after close: %v, want ErrClosed", err)
	}
	if err := f.Sync(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("sync after close: %v, want ErrClosed", err)
	}
	// A removed file lives on in its open handles.
	mustWrite(t, tr, []byte("still"), 0)
	if err := fs.Remove("x"); err != nil {
		t.Fatal(err)
	}
	if err := fs.Remove("x"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("second remove: %v", err)
	}
	b := make([]byte, 5)
	if _, err := tr.ReadAt(b, 0); err != nil || string(b) != "still" {
		t.Errorf("read of removed open file: %q, %v", b, err)
	}
}

func TestMemFSDevice(t *testing.T) {
	fs := NewMemFS()
	if err := fs.CreateDevice("dev", 4096); err != nil {
		t.Fatal(err)
	}
	f := mustOpen(t, fs, "dev", os.O_RDWR)
	if n, _ := f.Size(); n != 4096 {
		t.Errorf("device size %d", n)
	}
	if err := f.Truncate(8192); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("truncate device: %v, want EINVAL", err)
	}
	n, err := f.WriteAt(make([]byte, 200), 4000)
	if n != 96 || !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write across the end: %d, %v; want 96, ENOSPC", n, err)
	}
	if _, err := f.WriteAt([]byte{1}, 4096); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write past the end: %v, want ENOSPC", err)
	}
	if c := fs.CrashClone(CrashOptions{}); len(contents(t, c, "dev")) != 4096 {
		t.Error("crash changed a device's size")
	}
}

// TestMemFSConcurrent is for -race: writers, syncs and crash clones at once.
// Each writer owns a region and syncs after each write, so every clone must
// show, per region, one of that writer's complete synced values or an
// unsynced one — never a value from another region.
func TestMemFSConcurrent(t *testing.T) {
	fs := NewMemFS()
	f := mustOpen(t, fs, "a", os.O_RDWR|os.O_CREATE)
	const writers, rounds, region = 4, 200, 1024
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				p := bytes.Repeat([]byte{byte(w*rounds/writers + i%50)}, region)
				if _, err := f.WriteAt(p, int64(w*region)); err != nil {
					t.Error(err)
					return
				}
				if err := f.Sync(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	r := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 50; i++ {
		c := fs.CrashClone(CrashOptions{Rand: r})
		got := contents(t, c, "a")
		for w := 0; w < writers && (w+1)*region <= len(got); w++ {
			sec := got[w*region : (w+1)*region]
			if !bytes.Equal(sec, bytes.Repeat(sec[:1], region)) {
				t.Fatalf("clone %d: region %d mixed", i, w)
			}
		}
	}
	wg.Wait()
}
