package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestOverflowInvalidates: a snapshot whose backing store outgrows
// --max-size turns invalid with the reason, its reads fail with EIO instead
// of returning wrong data, and the origin write that overflowed it succeeds
// and reads back.
func TestOverflowInvalidates(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 16<<20)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "small", "--control", d.ctl, "--backing", filepath.Join(dir, "small.cow"), "--max-size", "256K")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4M", d.uri("data"))
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 4M", d.uri("data"))

	var s control.SnapshotInfo
	waitFor(t, func() bool {
		s = d.status(t).Snapshots[0]
		return s.State == control.StateInvalid
	})
	if !strings.Contains(s.Reason, "full") {
		t.Fatalf("reason %q does not say the store is full", s.Reason)
	}
	if out := mustCLI(t, "status", "small", "--control", d.ctl); !strings.Contains(out, ", invalid (") {
		t.Fatalf("status line: %s", out)
	}
	out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", d.uri("small")).CombinedOutput()
	if !strings.Contains(string(out), "Input/output error") {
		t.Fatalf("read of an invalid snapshot: %v\n%s", err, out)
	}
}

// TestBackingFilesystemFills: the backing store's filesystem fills up after
// the create; the snapshot turns invalid with the reason, the origin keeps
// every write.
func TestBackingFilesystemFills(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 16<<20)
	small := t.TempDir()
	run(t, "mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", small)
	t.Cleanup(func() { exec.Command("umount", small).Run() })
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(small, "s.cow"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 0 8M", d.uri("data"))
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x44 0 8M", d.uri("data"))
	var s control.SnapshotInfo
	waitFor(t, func() bool {
		s = d.status(t).Snapshots[0]
		return s.State == control.StateInvalid
	})
	if !strings.Contains(s.Reason, "no space left on device") && !strings.Contains(s.Reason, "full") {
		t.Fatalf("reason %q does not say the filesystem is full", s.Reason)
	}
	t.Logf("reason: %s", s.Reason)
}
