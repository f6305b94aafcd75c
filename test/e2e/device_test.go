package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestBlockDeviceBackingStore: a block device (here a loop device) named as
// --backing holds the snapshot, is held exclusively while in use, survives
// kill -9 and a restart, and is left in place (not deleted) by clear.
func TestBlockDeviceBackingStore(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 8<<20)
	img := filepath.Join(dir, "backing.img")
	run(t, "truncate", "-s", "16M", img)
	dev, _ := loopAttach(t, img, false)

	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", dev)
	_, errs, code := cli(t, "create", "t", "--control", d.ctl, "--backing", dev)
	if want := "nbdsnap: backing device " + dev + " is in use (mounted, or opened exclusively by another program)\n"; code != 1 || errs != want {
		t.Fatalf("second snapshot on the same device: exit %d, %q; want %q", code, errs, want)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4M", d.uri("data"))
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot on a block device differs from the origin at the create instant")
	}
	d.kill9()

	d = startDaemon(t, dir, origin)
	st := d.status(t)
	if len(st.Snapshots) != 1 || st.Snapshots[0].State != control.StateValid || !st.Snapshots[0].Served {
		t.Fatalf("after restart: %+v", st.Snapshots)
	}
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot on a block device differs after kill -9 and restart")
	}
	if out := mustCLI(t, "clear", "s", "--control", d.ctl); !strings.Contains(out, "s: cleared") {
		t.Fatalf("clear: %s", out)
	}
	if fi, err := os.Stat(dev); err != nil || fi.Mode()&os.ModeDevice == 0 {
		t.Fatalf("clear removed the backing device: %v", err)
	}
	if err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri("s")).Run(); err == nil {
		t.Fatal("cleared snapshot still served")
	}
}
