package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// stateSnap returns snapshot name as d lists it.
func stateSnap(t *testing.T, d *daemon, name string) control.SnapshotInfo {
	t.Helper()
	for _, s := range d.status(t).Snapshots {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("snapshot %q not listed", name)
	return control.SnapshotInfo{}
}

// stateNotServed fails the test if export name can be read.
func stateNotServed(t *testing.T, d *daemon, name string) {
	t.Helper()
	if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri(name)).CombinedOutput(); err == nil {
		t.Fatalf("export %q is served:\n%s", name, out)
	}
}

// stateStop stops d and fails the test unless it exits 0.
func stateStop(t *testing.T, d *daemon) {
	t.Helper()
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.log.String())
	}
}

// stateWrite writes pattern p at [off, off+n) of the origin through NBD.
func stateWrite(t *testing.T, d *daemon, p byte, off, n int) {
	t.Helper()
	run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %d %d", p, off, n), d.uri("data"))
}

// TestDamagedRecordDoesNotStopTheDaemon: a snapshot record that is empty,
// does not parse, or has a newer version does not keep the daemon down
// (the old daemon refused to start). The other snapshot is served as
// before; the damaged one is listed invalid, not served, with a reason
// naming the file and saying what to do, and `clear` removes the record
// alone, leaving the store it may have named in place, and says so.
func TestDamagedRecordDoesNotStopTheDaemon(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	damage := []struct {
		name   string
		record func(old []byte) []byte
	}{
		{"empty", func([]byte) []byte { return nil }},
		{"garbage", func([]byte) []byte { return []byte("{garbage") }},
		{"newer version", func(old []byte) []byte {
			var m map[string]any
			if err := json.Unmarshal(old, &m); err != nil {
				t.Fatal(err)
			}
			m["version"] = 99
			b, _ := json.Marshal(m)
			return b
		}},
	}
	for _, tc := range damage {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			origin := filepath.Join(dir, "origin.img")
			initial := randomFile(t, origin, 4<<20)
			d := startDaemon(t, dir, origin)
			mustCLI(t, "create", "a", "--control", d.ctl, "--backing", filepath.Join(dir, "a.cow"))
			mustCLI(t, "create", "b", "--control", d.ctl, "--backing", filepath.Join(dir, "b.cow"))
			stateWrite(t, d, 0x21, 0, 1<<20)
			stateStop(t, d)

			rec := filepath.Join(d.state, "snap-b.json")
			old, err := os.ReadFile(rec)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(rec, tc.record(old), 0o600); err != nil {
				t.Fatal(err)
			}
			store := disktest.Record(t, filepath.Join(dir, "b.cow"))

			d = startDaemon(t, dir, origin)
			if a := stateSnap(t, d, "a"); a.State != control.StateValid || !a.Served {
				t.Fatalf("snapshot a beside a damaged record: %+v", a)
			}
			if !bytes.Equal(readExport(t, d.uri("a")), initial) {
				t.Fatal("snapshot a differs from the origin at its create instant")
			}
			b := stateSnap(t, d, "b")
			if b.State != control.StateInvalid || b.Served || !strings.Contains(b.Reason, "snap-b.json") ||
				!strings.Contains(b.Reason, "nbdsnap clear b") {
				t.Fatalf("snapshot b with a damaged record: state %q, served %v, reason %q; want invalid, not served, naming snap-b.json and `nbdsnap clear b`",
					b.State, b.Served, b.Reason)
			}
			stateNotServed(t, d, "b")

			out, errs, code := cli(t, "clear", "b", "--control", d.ctl)
			if code != 0 || !strings.Contains(out, "left in place") {
				t.Fatalf("clear b: exit %d, stdout %q, stderr %q; want 0 saying the store was left in place", code, out, errs)
			}
			if _, err := os.Stat(rec); !os.IsNotExist(err) {
				t.Fatalf("the damaged record is still there after clear: %v", err)
			}
			store.Unchanged(t, disktest.Record(t, filepath.Join(dir, "b.cow")))
			for _, s := range d.status(t).Snapshots {
				if s.Name == "b" {
					t.Fatalf("b still listed after clear: %+v", s)
				}
			}
			if a := stateSnap(t, d, "a"); a.State != control.StateValid || !a.Served {
				t.Fatalf("snapshot a after clear b: %+v", a)
			}
			// The name is free again.
			mustCLI(t, "create", "b", "--control", d.ctl, "--backing", filepath.Join(dir, "b2.cow"))
		})
	}
}

// TestRepairedRecordIsOutOfDate: a record unreadable while the daemon ran
// (so the origin was written without copy-on-write for its snapshot) and
// then restored is not believed: the snapshot is invalid, with the reason,
// and not served, rather than valid with the origin's new data.
func TestRepairedRecordIsOutOfDate(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 4<<20)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "b", "--control", d.ctl, "--backing", filepath.Join(dir, "b.cow"))
	stateStop(t, d)

	rec := filepath.Join(d.state, "snap-b.json")
	saved, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rec, []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	d = startDaemon(t, dir, origin)
	if b := stateSnap(t, d, "b"); b.State != control.StateInvalid || b.Served {
		t.Fatalf("b with a garbled record: %+v", b)
	}
	// Served without copy-on-write for b.
	stateWrite(t, d, 0x5a, 0, 2<<20)
	stateStop(t, d)

	if err := os.WriteFile(rec, saved, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, when := range []string{"restored record", "next start"} {
		d = startDaemon(t, dir, origin)
		b := stateSnap(t, d, "b")
		if b.State != control.StateInvalid || b.Served || !strings.Contains(b.Reason, "without copy-on-write") ||
			!strings.Contains(b.Reason, "session") {
			t.Fatalf("%s: b is %q, served %v, reason %q; want invalid, not served: the origin was served without copy-on-write for it",
				when, b.State, b.Served, b.Reason)
		}
		stateNotServed(t, d, "b")
		stateStop(t, d)
	}
}

// TestBackingInsideStateDirRefused: a backing path inside the daemon's
// state directory, named directly or through a symbolic link, is refused
// with a line saying so, and nothing is created.
func TestBackingInsideStateDirRefused(t *testing.T) {
	e2e(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	d := startDaemon(t, dir, origin)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(d.state, link); err != nil {
		t.Fatal(err)
	}
	for _, backing := range []string{filepath.Join(d.state, "x.cow"), filepath.Join(link, "x.cow")} {
		before := disktest.Record(t, dir)
		_, errs, code := cli(t, "create", "s", "--control", d.ctl, "--backing", backing)
		if code != 1 || !strings.Contains(errs, "inside the daemon's state directory") {
			t.Fatalf("create --backing %s: exit %d, stderr %q; want 1, inside the daemon's state directory", backing, code, errs)
		}
		before.Unchanged(t, disktest.Record(t, dir))
		if n := len(d.status(t).Snapshots); n != 0 {
			t.Fatalf("%d snapshots after a refused create", n)
		}
	}
}

// stateStartDefault starts `nbdsnap serve` with no --state-dir, so that
// the daemon picks its default, and waits until it answers.
func stateStartDefault(t *testing.T, dir, origin, name string) *daemon {
	t.Helper()
	d := newDaemon(t, dir, origin, filepath.Join(dir, "data.sock"), filepath.Join(dir, "data.ctl"), filepath.Join("/var/lib/nbdsnap", name))
	d.spawn(name)
	d.waitReady(10 * time.Second)
	return d
}

// TestDefaultStateDir: without --state-dir the daemon records its
// snapshots in /var/lib/nbdsnap/NAME, so a persistent snapshot is reopened
// after a restart, valid and bit-exact. (The old daemon kept no record
// without --state-dir: the snapshot vanished at the restart, its store
// left behind.)
func TestDefaultStateDir(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "qemu-io")
	name := fmt.Sprintf("e2estate%d", os.Getpid())
	stateDir := filepath.Join("/var/lib/nbdsnap", name)
	if err := os.RemoveAll(stateDir); err != nil {
		t.Fatal(err)
	}
	// Registered first, so that it runs after the daemons have stopped.
	t.Cleanup(func() { os.RemoveAll(stateDir) })
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 4<<20)

	d := stateStartDefault(t, dir, origin, name)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))
	// The origin's export is named after the daemon.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x6c 0 2M", d.uri(name))
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot differs from the origin at its create instant")
	}
	stateStop(t, d)

	d = stateStartDefault(t, dir, origin, name)
	st := d.status(t)
	if len(st.Snapshots) != 1 || st.Snapshots[0].Name != "s" || st.Snapshots[0].State != control.StateValid || !st.Snapshots[0].Served {
		t.Fatalf("after a restart without --state-dir the daemon lists %+v; want s, valid and served", st.Snapshots)
	}
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot differs from the origin at its create instant after the restart")
	}
	if st.StateDir != stateDir {
		t.Fatalf("status state_dir %q; want %q", st.StateDir, stateDir)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "snap-s.json")); err != nil {
		t.Fatalf("no record in the default state directory: %v", err)
	}
}
