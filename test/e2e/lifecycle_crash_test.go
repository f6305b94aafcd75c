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
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// crashEnv makes `nbdsnap serve` kill itself with SIGKILL at a named step
// of create or clear (internal/cli/serve.go).
const crashEnv = "NBDSNAP_CRASHPOINT"

// crashHeaderBytes is the part of a store a clear or a rolled-back create
// wipes on a device: its two header slots.
const crashHeaderBytes = 8192

// crashStore is where one case keeps its snapshot: a file in a directory
// of its own, or a whole blank loop device.
type crashStore struct {
	kind    string // "file" or "device"
	backing string // the --backing argument
	dir     string // the file's directory; empty for a device
}

var crashStoreKinds = []string{"file", "device"}

// crashNewStore makes a fresh store location of kind under dir.
func crashNewStore(t *testing.T, dir, kind string) crashStore {
	t.Helper()
	if kind == "file" {
		stores := filepath.Join(dir, "stores")
		if err := os.Mkdir(stores, 0o700); err != nil {
			t.Fatal(err)
		}
		return crashStore{kind: kind, backing: filepath.Join(stores, "s.cow"), dir: stores}
	}
	testenv.RequireRoot(t)
	img := filepath.Join(dir, "dev.img")
	run(t, "truncate", "-s", "16M", img)
	dev, _ := loopAttach(t, img, false)
	return crashStore{kind: kind, backing: dev}
}

// crashStartAt starts the daemon on dir with the crash point set; the
// environment is restored at once, so that later daemons run without it.
func crashStartAt(t *testing.T, dir, origin, point string) *daemon {
	t.Helper()
	t.Setenv(crashEnv, point)
	d := startDaemon(t, dir, origin)
	os.Unsetenv(crashEnv)
	return d
}

// crashDied waits for d to have killed itself at point.
func crashDied(t *testing.T, d *daemon, point string) {
	t.Helper()
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("daemon still running 10s after it should have crashed at %s\n%s", point, d.log.String())
	}
	if !strings.Contains(d.log.String(), "crash point reached") || !strings.Contains(d.log.String(), point) {
		t.Fatalf("daemon exited (%v), but not at crash point %s:\n%s", d.waitErr, point, d.log.String())
	}
}

// crashCreateDies runs a create the daemon dies in: the CLI loses the
// answer, cannot ask the dead daemon what became of it, and says so.
func crashCreateDies(t *testing.T, d *daemon, point string, args ...string) {
	t.Helper()
	args = append([]string{"create", "s", "--control", d.ctl}, args...)
	_, errs, code := cli(t, args...)
	crashDied(t, d, point)
	if code != 1 || !strings.Contains(errs, "tells whether the snapshot exists") {
		t.Fatalf("create with the daemon dying at %s: exit %d, stderr %q; want exit 1 saying the outcome is unknown", point, code, errs)
	}
}

// crashNotThere fails the test if d lists or serves snapshot name, or has
// a record of it.
func crashNotThere(t *testing.T, d *daemon, name string) {
	t.Helper()
	for _, s := range d.status(t).Snapshots {
		if s.Name == name {
			t.Fatalf("snapshot %q listed after the restart: %+v", name, s)
		}
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri(name)).CombinedOutput(); err == nil {
		t.Fatalf("export %q served after the restart:\n%s", name, out)
	}
	if _, err := os.Stat(filepath.Join(d.state, "snap-"+name+".json")); !os.IsNotExist(err) {
		t.Fatalf("record of %q still in the state directory: %v", name, err)
	}
}

// crashPhase returns the phase in snapshot name's record, or "" if there
// is no record.
func crashPhase(t *testing.T, state, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "snap-"+name+".json"))
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	var r struct{ Phase string }
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("record of %q: %v\n%s", name, err, b)
	}
	return r.Phase
}

// crashLeft lists the backing directory of a file store.
func crashLeft(t *testing.T, st crashStore) []string {
	t.Helper()
	ents, err := os.ReadDir(st.dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// crashCreateLeft checks what a create killed at point left, before the
// restart settles it, so that the restart is seen to undo or keep it.
func crashCreateLeft(t *testing.T, d *daemon, st crashStore, point string) {
	t.Helper()
	want := map[string]string{"create:ready": "ready"}[point]
	if want == "" {
		want = "creating"
	}
	if got := crashPhase(t, d.state, "s"); got != want {
		t.Fatalf("record after a crash at %s has phase %q; want %q", point, got, want)
	}
	if st.kind == "device" {
		zero := bytes.Equal(crashHead(t, st.backing), make([]byte, crashHeaderBytes))
		if before := point == "create:record" || point == "create:store"; zero != before {
			t.Fatalf("after a crash at %s the device's header is zero: %v", point, zero)
		}
		return
	}
	left := crashLeft(t, st)
	switch point {
	case "create:record":
		if len(left) != 0 {
			t.Fatalf("after a crash at %s the backing directory holds %v; want nothing", point, left)
		}
	case "create:store", "create:instant":
		if len(left) != 1 || !strings.HasPrefix(left[0], ".s.cow.") || !strings.HasSuffix(left[0], ".nbdsnap-creating") {
			t.Fatalf("after a crash at %s the backing directory holds %v; want the staging file alone", point, left)
		}
	default:
		if len(left) != 1 || left[0] != "s.cow" {
			t.Fatalf("after a crash at %s the backing directory holds %v; want s.cow alone", point, left)
		}
	}
}

// crashStoreGone fails the test unless nothing is left of a store: the
// backing directory empty (no store, no staging file), or the device's
// header zero.
func crashStoreGone(t *testing.T, st crashStore) {
	t.Helper()
	if st.kind == "file" {
		if left := crashLeft(t, st); len(left) != 0 {
			t.Fatalf("left in the backing directory: %v", left)
		}
		return
	}
	if h := crashHead(t, st.backing); !bytes.Equal(h, make([]byte, crashHeaderBytes)) {
		t.Fatalf("device %s: the first %d bytes are not zero (a store header was left): %x…", st.backing, crashHeaderBytes, h[:64])
	}
}

// crashHead reads the first crashHeaderBytes of path.
func crashHead(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, crashHeaderBytes)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// crashWrite writes pattern p at [off, off+n) of the origin through NBD
// and into the model cur.
func crashWrite(t *testing.T, d *daemon, cur []byte, p byte, off, n int) {
	t.Helper()
	run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %d %d", p, off, n), d.uri("data"))
	for i := off; i < off+n; i++ {
		cur[i] = p
	}
}

// crashOriginWorks writes the origin and reads it back whole.
func crashOriginWorks(t *testing.T, d *daemon, cur []byte) {
	t.Helper()
	crashWrite(t, d, cur, 0x7e, 6<<20, 128<<10)
	if !bytes.Equal(readExport(t, d.uri("data")), cur) {
		t.Fatal("the origin export does not read back what was written to it")
	}
}

// crashSnapValid fails the test unless snapshot name is valid, served and
// reads want.
func crashSnapValid(t *testing.T, d *daemon, name string, want []byte) {
	t.Helper()
	var s *control.SnapshotInfo
	for _, x := range d.status(t).Snapshots {
		if x.Name == name {
			s = &x
		}
	}
	if s == nil || s.State != control.StateValid || !s.Served {
		t.Fatalf("snapshot %q: %+v; want valid and served", name, s)
	}
	if !bytes.Equal(readExport(t, d.uri(name)), want) {
		t.Fatalf("snapshot %q differs from the origin at its create instant", name)
	}
}

// TestCreateCrashPoints: a daemon killed at each step of a create, with a
// file store and with a device store, is restarted. A create killed before
// its record said ready is rolled back completely: the snapshot is not
// listed or served, no store file, staging file, record or device header
// is left, and the same create works again at once. A create killed after
// it is a snapshot, served and bit-exact the origin at the create.
func TestCreateCrashPoints(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	points := []string{"create:record", "create:store", "create:instant", "create:placed", "create:ready"}
	for _, kind := range crashStoreKinds {
		for _, point := range points {
			t.Run(kind+"/"+point, func(t *testing.T) {
				dir := t.TempDir()
				origin := filepath.Join(dir, "origin.img")
				initial := randomFile(t, origin, 8<<20)
				st := crashNewStore(t, dir, kind)
				var head []byte
				if kind == "device" {
					head = crashHead(t, st.backing)
				}

				d := crashStartAt(t, dir, origin, point)
				crashCreateDies(t, d, point, "--backing", st.backing)
				crashCreateLeft(t, d, st, point)

				d = startDaemon(t, dir, origin)
				cur := bytes.Clone(initial)
				if point == "create:ready" {
					crashSnapValid(t, d, "s", initial)
					crashWrite(t, d, cur, 0x3c, 0, 3<<20)
					crashSnapValid(t, d, "s", initial)
					if kind == "file" {
						if left := crashLeft(t, st); len(left) != 1 || left[0] != "s.cow" {
							t.Fatalf("backing directory after the restart holds %v; want s.cow alone", left)
						}
					}
					crashOriginWorks(t, d, cur)
					return
				}
				crashNotThere(t, d, "s")
				crashStoreGone(t, st)
				if kind == "device" && !bytes.Equal(crashHead(t, st.backing), head) {
					t.Fatalf("device %s: its first %d bytes changed", st.backing, crashHeaderBytes)
				}
				// The name and the path are free again.
				mustCLI(t, "create", "s", "--control", d.ctl, "--backing", st.backing)
				taken := bytes.Clone(cur)
				crashWrite(t, d, cur, 0x3c, 0, 3<<20)
				crashSnapValid(t, d, "s", taken)
				crashOriginWorks(t, d, cur)
			})
		}
	}
}

// TestCreateCrashOnReusedDevice: a device still holding an older store of
// a snapshot of the same name from the same daemon (what a clear by an
// older nbdsnap left: the store intact), made stale by later origin writes,
// is named again with --force; the daemon dies before the new store's
// header is written. The restart must not serve the old store as the
// snapshot: the create never completed, so nothing is listed or served.
// (The old daemon wrote the record first and reopened the old store as s,
// valid, with stale content.)
func TestCreateCrashOnReusedDevice(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "qemu-io")
	for _, point := range []string{"create:record", "create:store"} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			origin := filepath.Join(dir, "origin.img")
			initial := randomFile(t, origin, 8<<20)
			img := filepath.Join(dir, "dev.img")
			run(t, "truncate", "-s", "16M", img)
			dev, _ := loopAttach(t, img, false)

			// The older store: s on the device, clusters copied, closed
			// cleanly.
			d := startDaemon(t, dir, origin)
			mustCLI(t, "create", "s", "--control", d.ctl, "--backing", dev)
			cur := bytes.Clone(initial)
			crashWrite(t, d, cur, 0x11, 0, 2<<20)
			crashSnapValid(t, d, "s", initial)
			if err := d.stop(); err != nil {
				t.Fatalf("SIGTERM: %v", err)
			}
			old, err := os.ReadFile(dev)
			if err != nil {
				t.Fatal(err)
			}
			// Cleared, and the device given its old store back.
			d = startDaemon(t, dir, origin)
			mustCLI(t, "clear", "s", "--control", d.ctl)
			if err := os.WriteFile(dev, old, 0); err != nil {
				t.Fatal(err)
			}
			// The old store is stale now.
			crashWrite(t, d, cur, 0x22, 4<<20, 2<<20)
			if err := d.stop(); err != nil {
				t.Fatalf("SIGTERM: %v", err)
			}

			if out := mustCLI(t, "check", dev); !checkSaysOK(out) {
				t.Fatalf("the old store put back on %s does not check: %s", dev, out)
			}

			d = crashStartAt(t, dir, origin, point)
			crashCreateDies(t, d, point, "--backing", dev, "--force")
			if got := crashPhase(t, d.state, "s"); got != "creating" {
				t.Fatalf("record after a crash at %s has phase %q; want creating", point, got)
			}

			d = startDaemon(t, dir, origin)
			crashNotThere(t, d, "s")
			// Nothing was written to the device: the store that is not
			// the create's is left as it was.
			if now, err := os.ReadFile(dev); err != nil || !bytes.Equal(now, old) {
				t.Fatalf("the device's old store was changed by the rollback (%v)", err)
			}
			// And the device can be taken again, over the old store's
			// leftovers, for good: the new snapshot survives a restart.
			mustCLI(t, "create", "s", "--control", d.ctl, "--backing", dev, "--force")
			taken := bytes.Clone(cur)
			crashWrite(t, d, cur, 0x33, 0, 1<<20)
			crashSnapValid(t, d, "s", taken)
			d.kill9()
			d = startDaemon(t, dir, origin)
			crashSnapValid(t, d, "s", taken)
			crashOriginWorks(t, d, cur)
		})
	}
}

// TestClearCrashPoints: a daemon killed at each step of a clear, with a
// file store and with a device store, is restarted: the clear is finished.
// The snapshot is not listed or served, its store file deleted (a device's
// header zeroed), its record gone, and the name can be taken again. (The
// old daemon closed a device store clean before removing the record; a
// crash between served it as valid although the origin had moved on.)
func TestClearCrashPoints(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	points := []string{"clear:marked", "clear:stopped", "clear:retired"}
	for _, kind := range crashStoreKinds {
		for _, point := range points {
			t.Run(kind+"/"+point, func(t *testing.T) {
				dir := t.TempDir()
				origin := filepath.Join(dir, "origin.img")
				initial := randomFile(t, origin, 8<<20)
				st := crashNewStore(t, dir, kind)

				d := startDaemon(t, dir, origin)
				mustCLI(t, "create", "s", "--control", d.ctl, "--backing", st.backing)
				cur := bytes.Clone(initial)
				crashWrite(t, d, cur, 0x44, 1<<20, 2<<20)
				crashSnapValid(t, d, "s", initial)
				if err := d.stop(); err != nil {
					t.Fatalf("SIGTERM: %v", err)
				}

				d = crashStartAt(t, dir, origin, point)
				crashSnapValid(t, d, "s", initial)
				if _, _, code := cli(t, "clear", "s", "--control", d.ctl); code != 1 {
					t.Fatalf("clear with the daemon dying at %s: exit %d; want 1", point, code)
				}
				crashDied(t, d, point)
				if got := crashPhase(t, d.state, "s"); got != "clearing" {
					t.Fatalf("record after a crash at %s has phase %q; want clearing", point, got)
				}
				retired := point == "clear:retired"
				if kind == "file" {
					if left := crashLeft(t, st); retired != (len(left) == 0) {
						t.Fatalf("after a crash at %s the backing directory holds %v", point, left)
					}
				} else if zero := bytes.Equal(crashHead(t, st.backing), make([]byte, crashHeaderBytes)); zero != retired {
					t.Fatalf("after a crash at %s the device's header is zero: %v", point, zero)
				}

				d = startDaemon(t, dir, origin)
				crashNotThere(t, d, "s")
				crashStoreGone(t, st)
				// The origin moves on; the name is free again.
				crashWrite(t, d, cur, 0x55, 0, 1<<20)
				mustCLI(t, "create", "s", "--control", d.ctl, "--backing", st.backing)
				taken := bytes.Clone(cur)
				crashWrite(t, d, cur, 0x66, 0, 3<<20)
				crashSnapValid(t, d, "s", taken)
				crashOriginWorks(t, d, cur)
			})
		}
	}
}
