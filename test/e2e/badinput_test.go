package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestBadServe: `nbdsnap serve` refuses a missing origin and an origin in
// use with one clear line and exit code 1, leaving no socket or state
// behind.
func TestBadServe(t *testing.T) {
	e2e(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	held := startDaemon(t, dir, origin)
	other := t.TempDir()

	type tc struct {
		name   string
		origin string
		want   string
	}
	tests := []tc{
		{"missing origin", filepath.Join(other, "nope.img"), "nbdsnap: origin " + filepath.Join(other, "nope.img") + " does not exist\n"},
		{"origin in use by another daemon", origin, "nbdsnap: origin " + origin + " is in use (locked by another nbdsnap daemon or program)\n"},
	}
	if os.Geteuid() == 0 {
		// A block device that is mounted cannot be opened O_EXCL.
		img := filepath.Join(t.TempDir(), "fs.img")
		run(t, "truncate", "-s", "16M", img)
		run(t, "mkfs.ext4", "-q", "-F", img)
		dev, _ := loopAttach(t, img, false)
		mountDev(t, dev, "rw")
		tests = append(tests, tc{"mounted block device", dev,
			"nbdsnap: origin " + dev + " is in use (mounted, or opened exclusively by another program)\n"})
	} else {
		testenv.RequireRoot(t)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := disktest.Record(t, dir, other)
			_, errs, code := cli(t, "serve", tt.origin, "--name", "data2", "--log-level", "error",
				"--listen", "unix:"+filepath.Join(other, "data2.sock"), "--control", filepath.Join(other, "data2.ctl"),
				"--state-dir", filepath.Join(other, "state"))
			if code != 1 || errs != tt.want {
				t.Fatalf("exit %d, stderr %q; want 1, %q", code, errs, tt.want)
			}
			before.Unchanged(t, disktest.Record(t, dir, other))
		})
	}
	if st := held.status(t); st.Name != "data" {
		t.Fatalf("the first daemon is disturbed: %+v", st)
	}
}

// TestBadCreate: every refused create is one line on stderr, a non-zero
// exit, and no change: no file in the backing directory or the state
// directory, no new snapshot, no new export.
func TestBadCreate(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 4<<20)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s0", "--control", d.ctl, "--backing", filepath.Join(dir, "s0.cow"))

	type tc struct {
		name    string
		args    []string
		backing string
		code    int
		want    string
	}
	free := filepath.Join(dir, "s1.cow")
	tests := []tc{
		{"existing snapshot name", []string{"create", "s0"}, filepath.Join(dir, "again.cow"), 1, `nbdsnap: snapshot "s0" already exists` + "\n"},
		{"invalid cluster size", []string{"create", "s1", "--cluster-size", "48K"}, free, 2,
			"nbdsnap: invalid --cluster-size 48 KiB: must be a power of two from 4K to 1M\n"},
		{"malformed cluster size", []string{"create", "s1", "--cluster-size", "64Q"}, free, 2,
			`nbdsnap: invalid argument "64Q" for "--cluster-size" flag: size "64Q": not a number` + "\n"},
	}
	if os.Geteuid() == 0 {
		ro, full := t.TempDir(), t.TempDir()
		run(t, "mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro)
		t.Cleanup(func() { exec.Command("umount", ro).Run() })
		run(t, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", full)
		t.Cleanup(func() { exec.Command("umount", full).Run() })
		disktest.Fill(t, filepath.Join(full, "filler"))
		tests = append(tests,
			tc{"read-only filesystem", []string{"create", "s1"}, filepath.Join(ro, "s1.cow"), 1,
				"nbdsnap: backing path " + filepath.Join(ro, "s1.cow") + " is on a read-only filesystem\n"},
			tc{"full filesystem", []string{"create", "s1"}, filepath.Join(full, "s1.cow"), 1,
				"nbdsnap: no space for backing store " + filepath.Join(full, "s1.cow") + ": filesystem full\n"},
		)
	} else {
		testenv.RequireRoot(t)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			roots := []string{dir, filepath.Dir(tt.backing)}
			before := disktest.Record(t, roots...)
			snapsBefore := len(d.status(t).Snapshots)
			args := append(tt.args, "--control", d.ctl, "--backing", tt.backing)
			_, errs, code := cli(t, args...)
			if code != tt.code || errs != tt.want {
				t.Fatalf("exit %d, stderr %q; want %d, %q", code, errs, tt.code, tt.want)
			}
			before.Unchanged(t, disktest.Record(t, roots...))
			if n := len(d.status(t).Snapshots); n != snapsBefore {
				t.Fatalf("snapshots %d → %d", snapsBefore, n)
			}
			if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri("s1")).CombinedOutput(); err == nil {
				t.Fatalf("export s1 exists after a refused create:\n%s", out)
			}
		})
	}
}

// TestNoDaemon: a client command without a daemon says so in one line.
func TestNoDaemon(t *testing.T) {
	e2e(t)
	ctl := filepath.Join(t.TempDir(), "x.ctl")
	for _, args := range [][]string{
		{"status", "--control", ctl},
		{"list", "--control", ctl, "--json"},
		{"create", "s", "--backing", "/tmp/never.cow", "--control", ctl},
		{"clear", "s", "--control", ctl},
	} {
		_, errs, code := cli(t, args...)
		want := "nbdsnap: no daemon at " + ctl + " — is `nbdsnap serve` running?\n"
		if code != 1 || errs != want {
			t.Errorf("%v: exit %d, stderr %q; want 1, %q", args, code, errs, want)
		}
	}
	if _, err := os.Stat("/tmp/never.cow"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/tmp/never.cow exists")
	}
}

// TestControlSocketIsPrivate: the control socket is mode 0600, so another
// user cannot create or clear snapshots, and is told why.
func TestControlSocketIsPrivate(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	dir := t.TempDir()
	// Let the other user reach the socket (the test's directories are 0700),
	// not use it.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	d := startDaemon(t, dir, origin)
	fi, err := os.Stat(d.ctl)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, %v", fi.Mode(), err)
	}
	bin := filepath.Join(t.TempDir(), "nbdsnap")
	b, _ := os.ReadFile(nbdsnapBin)
	os.WriteFile(bin, b, 0o755)
	os.Chmod(filepath.Dir(bin), 0o755)
	cmd := exec.Command(bin, "status", "--control", d.ctl)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var errb strings.Builder
	cmd.Stderr = &errb
	err = cmd.Run()
	want := "nbdsnap: control socket " + d.ctl + ": permission denied (it is mode 0600; run as its owner, usually root)\n"
	if err == nil || errb.String() != want {
		t.Fatalf("as nobody: %v, stderr %q; want %q", err, errb.String(), want)
	}
}

// TestOriginHeldExclusively: while the daemon serves a block device, the
// device cannot be mounted behind its back.
func TestOriginHeldExclusively(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.ext4")
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	run(t, "truncate", "-s", "16M", img)
	run(t, "mkfs.ext4", "-q", "-F", img)
	dev, _ := loopAttach(t, img, false)
	startDaemon(t, dir, dev)
	mnt := t.TempDir()
	out, err := exec.Command("mount", "-o", "ro", dev, mnt).CombinedOutput()
	if err == nil {
		exec.Command("umount", mnt).Run()
		t.Fatalf("mounted %s while the daemon serves it", dev)
	}
	if !strings.Contains(strings.ToLower(string(out)), "busy") {
		t.Fatalf("mount failed, but not because the device is busy: %s", out)
	}
}
