package vfstest

import (
	"bytes"
	"errors"
	"os"
	"syscall"
	"testing"
)

func TestFaultNthWrite(t *testing.T) {
	mem := NewMemFS()
	ff := NewFaultFS(mem)
	f := mustOpen(t, ff, "s", os.O_RDWR|os.O_CREATE)
	ff.Inject(Rule{Kind: OpWrite, Nth: 3, Err: syscall.ENOSPC})
	for i := 1; i <= 5; i++ {
		_, err := f.WriteAt([]byte{byte(i)}, int64(i))
		if i == 3 {
			var pe *os.PathError
			if !errors.Is(err, syscall.ENOSPC) || !errors.As(err, &pe) || pe.Path != "s" {
				t.Fatalf("write 3: %v, want *os.PathError wrapping ENOSPC", err)
			}
		} else if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if got := contents(t, mem, "s"); !bytes.Equal(got, []byte{0, 1, 2, 0, 4, 5}) {
		t.Errorf("contents %v: the failed write must not reach the file", got)
	}
	if ff.Count(OpWrite) != 5 || ff.Injected() != 1 {
		t.Errorf("counts: writes %d, injected %d", ff.Count(OpWrite), ff.Injected())
	}
}

func TestFaultForeverPredicateAndReset(t *testing.T) {
	ff := NewFaultFS(NewMemFS())
	f := mustOpen(t, ff, "s", os.O_RDWR|os.O_CREATE)
	ff.Inject(Rule{Kind: OpSync, Times: -1})                                               // every Sync: EIO
	ff.Inject(Rule{Kind: OpRead, Pred: func(o Op) bool { return o.Off >= 100 }, Times: 2}) // two reads past 100
	mustWrite(t, f, make([]byte, 200), 0)
	for i := 0; i < 3; i++ {
		if err := f.Sync(); !errors.Is(err, syscall.EIO) {
			t.Fatalf("sync %d: %v, want EIO", i, err)
		}
	}
	buf := make([]byte, 10)
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatalf("read at 0: %v", err)
	}
	for i := 0; i < 3; i++ {
		_, err := f.ReadAt(buf, 150)
		if want := i < 2; errors.Is(err, syscall.EIO) != want {
			t.Fatalf("read %d at 150: %v (fault expected: %v)", i, err, want)
		}
	}
	ff.Reset()
	if err := f.Sync(); err != nil {
		t.Fatalf("sync after Reset: %v", err)
	}
}

func TestFaultPartialWriteAndWrap(t *testing.T) {
	mem := NewMemFS()
	raw := mustOpen(t, mem, "s", os.O_RDWR|os.O_CREATE)
	ff := NewFaultFS(nil)
	f := ff.Wrap("store", raw)
	ff.Inject(Rule{Kind: OpWrite, Name: "other", Times: -1}) // another file: never fires here
	ff.Inject(Rule{Kind: OpWrite, Name: "store", Err: syscall.ENOSPC, Partial: true})
	n, err := f.WriteAt(bytes.Repeat([]byte{7}, 2048), 0)
	if n != 1024 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("partial write: %d, %v; want 1024, ENOSPC", n, err)
	}
	if got := contents(t, mem, "s"); len(got) != 1024 {
		t.Errorf("file holds %d bytes, want the 1024-byte prefix", len(got))
	}
	if err := f.(interface{ Deallocate(int64, int64) error }).Deallocate(0, 512); err != nil {
		t.Errorf("deallocate through the wrapper: %v", err)
	}
}
