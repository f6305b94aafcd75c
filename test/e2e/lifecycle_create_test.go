package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// createHeldUp is a daemon whose create instant cannot come: snapshot s1's
// store is on a file system that is frozen, and an origin write to a
// cluster s1 has not copied waits for s1's commit, holding the origin
// writes' side of the create barrier. thaw lets it all go on.
type createHeldUp struct {
	d      *daemon
	dir    string
	origin []byte
	writer *exec.Cmd
	thaw   func()
}

func holdCreates(t *testing.T) *createHeldUp {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fsfreeze")
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 16<<20)
	img := filepath.Join(dir, "stores.img")
	run(t, "truncate", "-s", "32M", img)
	run(t, "mkfs.ext4", "-q", "-F", img)
	dev, _ := loopAttach(t, img, false)
	stores, _ := mountDev(t, dev, "rw")
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", filepath.Join(stores, "s1.cow"))

	run(t, "fsfreeze", "-f", stores)
	frozen := true
	h := &createHeldUp{d: d, dir: dir, origin: initial}
	h.thaw = func() {
		if frozen {
			frozen = false
			run(t, "fsfreeze", "-u", stores)
		}
		if h.writer != nil {
			h.writer.Wait()
			h.writer = nil
		}
	}
	t.Cleanup(h.thaw)
	before := d.status(t).Snapshots[0].Stats.CowCalls
	h.writer = exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 64k", d.uri("data"))
	if err := h.writer.Start(); err != nil {
		t.Fatal(err)
	}
	// The write has reached copy-on-write: its commit now waits for the
	// frozen file system, and the write holds the barrier.
	waitFor(t, func() bool { return d.status(t).Snapshots[0].Stats.CowCalls > before })
	return h
}

// checkNothingCreated: after the thaw, the daemon lists only s1, and
// nothing of name is left: no record, no store file, no staging file.
func (h *createHeldUp) checkNothingCreated(t *testing.T, name string) {
	t.Helper()
	h.thaw()
	// A create the client gave up on would complete now, had the daemon
	// not abandoned it.
	time.Sleep(300 * time.Millisecond)
	st := h.d.status(t)
	if len(st.Snapshots) != 1 || st.Snapshots[0].Name != "s1" {
		t.Fatalf("after the thaw the daemon lists %+v; the create the CLI reported as not done must not exist", st.Snapshots)
	}
	ents, err := os.ReadDir(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.Contains(e.Name(), name) {
			t.Fatalf("%s left in the backing directory by an abandoned create", e.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(h.d.state, "snap-"+name+".json")); !os.IsNotExist(err) {
		t.Fatalf("record of an abandoned create: %v", err)
	}
	// And the name is free, the barrier released: a create now succeeds.
	mustCLI(t, "create", name, "--control", h.d.ctl, "--backing", filepath.Join(h.dir, name+".cow"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 1M", h.d.uri("data"))
	if got := readExport(t, h.d.uri("s1")); !bytes.Equal(got, h.origin) {
		t.Fatal("s1 differs from the origin at its create instant")
	}
}

// TestCreateTimeoutAbandons: a create whose instant cannot come within
// --timeout (an origin write in flight waits for a store on a frozen file
// system) is abandoned by the daemon, the CLI says nothing was created, and
// nothing is: once the hold-up ends, the daemon does not take the snapshot
// behind the user's back (it used to: the CLI gave up with "context
// deadline exceeded" and the daemon went on).
func TestCreateTimeoutAbandons(t *testing.T) {
	e2e(t)
	h := holdCreates(t)
	start := time.Now()
	_, errs, code := cli(t, "create", "s2", "--control", h.d.ctl, "--backing", filepath.Join(h.dir, "s2.cow"), "--timeout", "1s")
	if code != 1 || !strings.Contains(errs, "abandoned before its instant") || !strings.Contains(errs, "nothing was created") {
		t.Fatalf("create with --timeout 1s held up: exit %d, stderr %q; want exit 1 saying nothing was created", code, errs)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("create with --timeout 1s took %v", d)
	}
	h.checkNothingCreated(t, "s2")
}

// TestCreateFreezeAbandoned: with --freeze, the thaw comes only once the
// daemon has decided; a create abandoned at its timeout leaves the frozen
// file system thawed and no snapshot (before, the CLI thawed at its own
// timeout while the daemon took the snapshot later, of a thawed file
// system).
func TestCreateFreezeAbandoned(t *testing.T) {
	e2e(t)
	h := holdCreates(t)
	img := filepath.Join(t.TempDir(), "app.img")
	run(t, "truncate", "-s", "16M", img)
	run(t, "mkfs.ext4", "-q", "-F", img)
	dev, _ := loopAttach(t, img, false)
	app, _ := mountDev(t, dev, "rw")
	_, errs, code := cli(t, "create", "s3", "--control", h.d.ctl, "--backing", filepath.Join(h.dir, "s3.cow"),
		"--timeout", "1s", "--freeze", app)
	if code != 1 || !strings.Contains(errs, "nothing was created") {
		t.Fatalf("frozen create held up: exit %d, stderr %q", code, errs)
	}
	// Thawed: FITHAW on a file system that is not frozen fails.
	if out, err := exec.Command("fsfreeze", "-u", app).CombinedOutput(); err == nil {
		t.Fatalf("%s was still frozen after the create returned", app)
	} else if !strings.Contains(string(out), "Invalid argument") {
		t.Fatalf("fsfreeze -u %s: %v: %s", app, err, out)
	}
	h.checkNothingCreated(t, "s3")
}

// TestCreateInterrupted: SIGINT to a create held up before its instant:
// the CLI does not just vanish with "context canceled", it reports the
// daemon's outcome, which is that nothing was created.
func TestCreateInterrupted(t *testing.T) {
	e2e(t)
	h := holdCreates(t)
	cmd := exec.Command(nbdsnapBin, "create", "s4", "--control", h.d.ctl, "--backing", filepath.Join(h.dir, "s4.cow"), "--timeout", "1m")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(errb.String(), "nothing was created") {
		t.Fatalf("interrupted create: %v, stderr %q; want exit 1 saying nothing was created", err, errb.String())
	}
	h.checkNothingCreated(t, "s4")
}
