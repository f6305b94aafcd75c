package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestKill9Restart: a daemon killed with SIGKILL while a writer hammers the
// origin, restarted with the same --state-dir, serves its persistent
// snapshot again byte-identical to the origin at the create instant, keeps
// protecting it against new writes, and reports the transient snapshot as
// invalid and does not serve it.
func TestKill9Restart(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	const size = 16 << 20
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, size)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "keep", "--control", d.ctl, "--backing", filepath.Join(dir, "keep.cow"), "--cluster-size", "16K")
	mustCLI(t, "create", "temp", "--control", d.ctl, "--backing", filepath.Join(dir, "temp.cow"), "--transient")

	// Kill the daemon in the middle of a write load.
	w, _ := startWriter(t, dir, d.uri("data"), size/(8<<10), 8<<10, 4, 2.0)
	time.Sleep(700 * time.Millisecond)
	d.kill9()
	w.Wait() // the writer stops at its first error; that is expected here
	// The store a killed daemon leaves behind is consistent.
	if out := mustCLI(t, "check", filepath.Join(dir, "keep.cow")); !checkSaysOK(out) {
		t.Fatalf("check after kill -9: %s", out)
	}
	if !bytes.Equal(readExportAfterRestart(t, dir, origin, "keep"), initial) {
		t.Fatal("persistent snapshot differs from the origin at the create instant after kill -9 and restart")
	}
}

// readExportAfterRestart restarts the daemon on the same state dir, checks
// what a restart must show, and returns the named snapshot's content.
func readExportAfterRestart(t *testing.T, dir, origin, keep string) []byte {
	t.Helper()
	d := startDaemon(t, dir, origin)
	st := d.status(t)
	byName := map[string]control.SnapshotInfo{}
	for _, s := range st.Snapshots {
		byName[s.Name] = s
	}
	k, tmp := byName[keep], byName["temp"]
	if k.State != control.StateValid || !k.Served || !k.Persistent || k.ClustersCopied == 0 {
		t.Fatalf("persistent snapshot after restart: %+v", k)
	}
	if tmp.State != control.StateInvalid || tmp.Served || !strings.Contains(tmp.Reason, "transient") {
		t.Fatalf("transient snapshot after restart: %+v", tmp)
	}
	out := mustCLI(t, "status", "--control", d.ctl)
	if !strings.Contains(out, "temp: origin data") || !strings.Contains(out, "invalid (transient snapshot: it did not survive the daemon restart)") {
		t.Fatalf("human status does not show the transient snapshot as gone:\n%s", out)
	}
	// The transient snapshot is not served at all.
	if b, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri("temp")).CombinedOutput(); err == nil {
		t.Fatalf("transient snapshot still served after restart:\n%s", b)
	}
	snap := readExport(t, d.uri(keep))

	// Copy-on-write protects the reopened snapshot against new writes.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "write -P 0x78 5M 3M", d.uri("data"))
	if again := readExport(t, d.uri(keep)); !bytes.Equal(again, snap) {
		t.Fatal("reopened snapshot changed when the origin was written after the restart")
	}
	// A clean stop exits 0.
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.log.String())
	}
	return snap
}

// TestSigtermUnderLoad: SIGTERM while four connections write: the daemon
// exits 0, every write it acknowledged is in the origin file, and the
// persistent snapshot taken before reopens equal to the original content.
func TestSigtermUnderLoad(t *testing.T) {
	e2e(t)
	const size, bs = 16 << 20, 8 << 10
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, size)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "keep", "--control", d.ctl, "--backing", filepath.Join(dir, "keep.cow"))
	w, logPath := startWriter(t, dir, d.uri("data"), size/bs, bs, 4, 2.0)
	time.Sleep(700 * time.Millisecond)
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM under load: %v\n%s", err, d.log.String())
	}
	w.Wait()
	if out := mustCLI(t, "check", filepath.Join(dir, "keep.cow")); !checkSaysOK(out) {
		t.Fatalf("check after SIGTERM: %s", out)
	}
	writes := readWrites(t, logPath)
	if len(writes) == 0 {
		t.Fatal("the writer wrote nothing before SIGTERM")
	}
	got, err := os.ReadFile(origin)
	if err != nil {
		t.Fatal(err)
	}
	for b, ws := range writes {
		last := ws[len(ws)-1] // acknowledged, so it must be there
		if !bytes.Equal(got[int(b)*bs:(int(b)+1)*bs], pattern(last.block, last.id, bs)) {
			t.Fatalf("block %d: acknowledged write %d missing from the origin after SIGTERM", b, last.id)
		}
	}
	d2 := startDaemon(t, dir, origin)
	if snap := readExport(t, d2.uri("keep")); !bytes.Equal(snap, initial) {
		t.Fatal("persistent snapshot differs after SIGTERM and restart")
	}
}

// checkSaysOK reports whether `nbdsnap check` found no problem: its summary
// line, the first, ends in ", ok". Notice lines may follow it (a batch in
// flight at a kill -9 is dropped, which is safe and reported).
func checkSaysOK(out string) bool {
	first, _, _ := strings.Cut(out, "\n")
	return strings.HasSuffix(first, ", ok")
}
