package vfstest

import (
	"bytes"
	"os"
	"testing"
	"time"
)

// TestStall: while held, a write and a sync wait (and are counted as
// blocked) without reaching the file, reads go through; Resume lets them
// finish, and later calls do not wait.
func TestStall(t *testing.T) {
	mem := NewMemFS()
	var s Stall
	f := s.Wrap(mustOpen(t, mem, "s", os.O_RDWR|os.O_CREATE))
	mustWrite(t, f, []byte{1, 2, 3}, 0)
	s.Hold()
	done := make(chan error, 2)
	go func() {
		_, err := f.WriteAt([]byte{9}, 1)
		done <- err
	}()
	go func() { done <- f.Sync() }()
	for deadline := time.Now().Add(10 * time.Second); s.Blocked() < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls blocked after 10s, want 2", s.Blocked())
		}
	}
	p := make([]byte, 3)
	if _, err := f.ReadAt(p, 0); err != nil || !bytes.Equal(p, []byte{1, 2, 3}) {
		t.Fatalf("read while held: %v %v; want the old contents, not blocked", p, err)
	}
	select {
	case err := <-done:
		t.Fatalf("a call returned while held: %v", err)
	default:
	}
	s.Resume()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if s.Blocked() != 0 {
		t.Fatalf("%d calls still blocked after Resume", s.Blocked())
	}
	mustWrite(t, f, []byte{7}, 2)
	if got := contents(t, mem, "s"); !bytes.Equal(got, []byte{1, 9, 7}) {
		t.Fatalf("contents %v", got)
	}
}
