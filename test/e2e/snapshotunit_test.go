package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// unitScripts returns the shell scripts of nbdsnap-snapshot@.service's
// ExecStart and ExecStop, after the substitutions systemd makes for instance
// instance: line continuations joined, %I and %i expanded, %% → %, $$ → $.
func unitScripts(t *testing.T, instance string) (start, stop string) {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(self), "..", "..", "systemd", "nbdsnap-snapshot@.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(string(b), "\\\n", " ")
	re := regexp.MustCompile(`(?m)^(ExecStart|ExecStop)=/bin/sh -euc '([^']*)' nbdsnap-snapshot %I$`)
	scripts := map[string]string{}
	for _, m := range re.FindAllStringSubmatch(unit, -1) {
		s := strings.NewReplacer("%I", instance, "%%", "%").Replace(m[2])
		s = strings.ReplaceAll(s, "$$", "$")
		scripts[m[1]] = strings.ReplaceAll(s, "/usr/local/bin/nbdsnap", nbdsnapBin)
	}
	if scripts["ExecStart"] == "" || scripts["ExecStop"] == "" {
		t.Fatalf("nbdsnap-snapshot@.service: ExecStart/ExecStop not of the form /bin/sh -euc '...' nbdsnap-snapshot %%I")
	}
	return scripts["ExecStart"], scripts["ExecStop"]
}

// TestSnapshotUnitScripts runs the snapshot unit's start and stop scripts as
// systemd would for nbdsnap-snapshot@ORIGIN-SNAP.service, against a real
// daemon under /run/nbdsnap and a stand-in nbd-client that records its
// arguments (this host has no nbd driver). Start must create the snapshot
// and attach it read-only; stop must detach and clear it; a failed attach
// must leave no snapshot behind.
func TestSnapshotUnitScripts(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	name := fmt.Sprintf("e2e%d", os.Getpid())
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 4<<20)
	d := startDaemonAt(t, dir, origin, name, "/run/nbdsnap/"+name+".sock", "/run/nbdsnap/"+name+".ctl")

	bin := t.TempDir()
	record := filepath.Join(dir, "nbd-client.args")
	fake := "#!/bin/sh\necho \"$*\" >> " + record + "\n[ \"$1\" = -d ] || [ -z \"$FAIL_ATTACH\" ]\n"
	if err := os.WriteFile(filepath.Join(bin, "nbd-client"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	start, stop := unitScripts(t, name+"/nightly")
	backing := filepath.Join(dir, "nightly.cow")
	sh := func(script string, env ...string) (string, error) {
		cmd := exec.Command("/bin/sh", "-euc", script, "nbdsnap-snapshot", name+"/nightly")
		cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"), "NBD_DEVICE=/dev/nbd7",
			"BACKING="+backing, "CREATE_OPTS=--cluster-size 16K")
		cmd.Env = append(cmd.Env, env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	if out, err := sh(start); err != nil {
		t.Fatalf("ExecStart: %v\n%s", err, out)
	}
	st := d.status(t)
	if len(st.Snapshots) != 1 || st.Snapshots[0].Name != "nightly" || st.Snapshots[0].ClusterSize != 16<<10 ||
		st.Snapshots[0].BackingPath != backing {
		t.Fatalf("after ExecStart: %+v", st.Snapshots)
	}
	if out, err := sh(stop); err != nil {
		t.Fatalf("ExecStop: %v\n%s", err, out)
	}
	if n := len(d.status(t).Snapshots); n != 0 {
		t.Fatalf("%d snapshots after ExecStop", n)
	}
	args, _ := os.ReadFile(record)
	want := "-unix /run/nbdsnap/" + name + ".sock /dev/nbd7 -name nightly -readonly\n-d /dev/nbd7\n"
	if string(args) != want {
		t.Fatalf("nbd-client called with\n%s\nwant\n%s", args, want)
	}

	// An attach that fails clears the snapshot it just created.
	if out, err := sh(start, "FAIL_ATTACH=1"); err == nil {
		t.Fatalf("ExecStart succeeded although nbd-client failed\n%s", out)
	}
	if n := len(d.status(t).Snapshots); n != 0 {
		t.Fatalf("%d snapshots left after a failed attach", n)
	}
	if _, err := os.Stat(backing); !os.IsNotExist(err) {
		t.Fatalf("backing store left after a failed attach: %v", err)
	}

	// A snapshot that survives an unclean stop (stop never ran, the
	// snapshot persisted across the daemon's restart) is attached again,
	// not created anew; a failed attach then leaves it alone, as this start
	// did not create it.
	mustCLI(t, "create", name+"/nightly", "--backing", backing)
	created := d.status(t).Snapshots[0].Created
	if err := os.Remove(record); err != nil {
		t.Fatal(err)
	}
	if out, err := sh(start); err != nil || !strings.Contains(out, "attaching it") {
		t.Fatalf("ExecStart over a surviving snapshot: %v\n%s", err, out)
	}
	if st := d.status(t); len(st.Snapshots) != 1 || !st.Snapshots[0].Created.Equal(created) {
		t.Fatalf("after ExecStart over a surviving snapshot: %+v", st.Snapshots)
	}
	args, _ = os.ReadFile(record)
	if want := "-unix /run/nbdsnap/" + name + ".sock /dev/nbd7 -name nightly -readonly\n"; string(args) != want {
		t.Fatalf("nbd-client called with\n%s\nwant\n%s", args, want)
	}
	if out, err := sh(start, "FAIL_ATTACH=1"); err == nil {
		t.Fatalf("ExecStart succeeded although nbd-client failed\n%s", out)
	}
	if n := len(d.status(t).Snapshots); n != 1 {
		t.Fatalf("%d snapshots after a failed attach of a surviving snapshot, want it kept", n)
	}
	if out, err := sh(stop); err != nil {
		t.Fatalf("ExecStop: %v\n%s", err, out)
	}
	if n := len(d.status(t).Snapshots); n != 0 {
		t.Fatalf("%d snapshots after ExecStop", n)
	}
}
