package stallfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	ServeIfAsked()
	os.Exit(m.Run())
}

// waitBlocked waits until n writes are held.
func waitBlocked(t *testing.T, s *FS, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); s.Blocked() < n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d writes held after 10s, want %d", s.Blocked(), n)
		}
	}
}

// TestHoldAndResume: a held write waits in the kernel and leaves the
// mirrored file alone; it completes on Resume.
func TestHoldAndResume(t *testing.T) {
	under := t.TempDir()
	s := Mount(t, under)
	f, err := os.OpenFile(filepath.Join(s.Dir(), "f"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("old"), 0); err != nil {
		t.Fatal(err)
	}
	s.Hold()
	done := make(chan error, 1)
	go func() {
		_, err := f.WriteAt([]byte("new"), 0)
		done <- err
	}()
	waitBlocked(t, s, 1)
	if b, err := os.ReadFile(filepath.Join(under, "f")); err != nil || string(b[:3]) != "old" {
		t.Fatalf("mirrored file %q, %v while the write is held", b, err)
	}
	select {
	case err := <-done:
		t.Fatalf("held write returned: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	s.Resume()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(under, "f")); string(b[:3]) != "new" {
		t.Fatalf("mirrored file %q after Resume", b)
	}
}

// TestHeldWriterCanExit: a process stuck in a held write dies when killed
// (the kernel interrupts the request), rather than hanging until Resume.
func TestHeldWriterCanExit(t *testing.T) {
	s := Mount(t, t.TempDir())
	s.Hold()
	cmd := exec.Command("dd", "if=/dev/zero", "of="+filepath.Join(s.Dir(), "f"), "bs=64k", "count=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitBlocked(t, s, 1)
	start := time.Now()
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a killed writer took %v to exit", d)
	}
}
