package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// undo registers f as a cleanup and returns it made idempotent, so a test
// can undo a mount early (in order) and the cleanup still covers failures.
func undo(t *testing.T, f func()) func() {
	var once sync.Once
	g := func() { once.Do(f) }
	t.Cleanup(g)
	return g
}

// fuseAttach exposes an NBD export as the file MOUNTPOINT/disk with nbdfuse
// and returns its path and the function that detaches it.
func fuseAttach(t *testing.T, uri string, readonly bool) (string, func()) {
	t.Helper()
	testenv.RequireTool(t, "nbdfuse")
	testenv.RequireTool(t, "fusermount3")
	mnt := t.TempDir()
	pidfile := filepath.Join(t.TempDir(), "pid")
	args := []string{"-P", pidfile}
	if readonly {
		args = append(args, "-r")
	}
	args = append(args, filepath.Join(mnt, "disk"), uri)
	cmd := exec.Command("nbdfuse", args...)
	var errb testenv.SyncBuffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	detach := undo(t, func() {
		exec.Command("fusermount3", "-u", mnt).Run()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(pidfile); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("nbdfuse %s exited: %v: %s", uri, err, errb.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse %s not ready after 10s: %s", uri, errb.String())
		}
	}
	return filepath.Join(mnt, "disk"), detach
}

// loopAttach binds a loop device to file.
func loopAttach(t *testing.T, file string, readonly bool) (string, func()) {
	t.Helper()
	args := []string{"-f", "--show"}
	if readonly {
		args = append(args, "-r")
	}
	dev := strings.TrimSpace(run(t, "losetup", append(args, file)...))
	return dev, undo(t, func() { exec.Command("losetup", "-d", dev).Run() })
}

func mountDev(t *testing.T, dev, opts string) (string, func()) {
	t.Helper()
	dir := t.TempDir()
	run(t, "mount", "-o", opts, dev, dir)
	return dir, undo(t, func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
}

// fileSums maps every regular file under dir (lost+found aside) to its hash.
func fileSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "lost+found" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			s := sha256.Sum256(b)
			rel, _ := filepath.Rel(dir, p)
			m[rel] = hex.EncodeToString(s[:])
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func writeRandom(t *testing.T, path string, size int) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestExt4ThroughNbdfuse: an ext4 filesystem on the origin, mounted through
// the proxy export (nbdfuse + loop), gets files; `create --freeze` takes a
// snapshot; the files are changed, deleted and added to. The snapshot,
// attached read-only the same way, passes `e2fsck -n -f` and mounts showing
// exactly the old files with the old content. While it is attached, clear
// is refused; detached, clear removes it.
func TestExt4ThroughNbdfuse(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "e2fsck", "losetup", "mount"} {
		testenv.RequireTool(t, tool)
	}
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	run(t, "truncate", "-s", "64M", origin)
	run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", origin)
	d := startDaemon(t, dir, origin)

	file, unfuse := fuseAttach(t, d.uri("data"), false)
	dev, unloop := loopAttach(t, file, false)
	mnt, unmount := mountDev(t, dev, "rw")
	os.Mkdir(filepath.Join(mnt, "sub"), 0o755)
	for i := range 12 {
		writeRandom(t, filepath.Join(mnt, fmt.Sprintf("sub/f%02d", i)), 40<<10+i*50<<10)
	}
	want := fileSums(t, mnt)

	// A create that the daemon refuses still thaws the filesystem: fsfreeze
	// can freeze it again (a frozen one answers EBUSY).
	testenv.RequireTool(t, "fsfreeze")
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", mnt).Run() })
	taken := filepath.Join(dir, "taken")
	os.WriteFile(taken, nil, 0o600)
	if _, errs, code := cli(t, "create", "bad", "--control", d.ctl, "--backing", taken, "--freeze", mnt); code != 1 ||
		!strings.Contains(errs, "already exists") {
		t.Fatalf("create over an existing backing file: exit %d: %s", code, errs)
	}
	run(t, "fsfreeze", "-f", mnt)
	run(t, "fsfreeze", "-u", mnt)

	backing := filepath.Join(dir, "snap.cow")
	mustCLI(t, "create", "snap", "--control", d.ctl, "--backing", backing, "--freeze", mnt)
	run(t, "fsfreeze", "-f", mnt) // thawed after success too
	run(t, "fsfreeze", "-u", mnt)

	// The origin filesystem is thawed and changes after the snapshot.
	for i := range 4 {
		writeRandom(t, filepath.Join(mnt, fmt.Sprintf("sub/f%02d", i)), 100<<10)
	}
	for i := 4; i < 7; i++ {
		os.Remove(filepath.Join(mnt, fmt.Sprintf("sub/f%02d", i)))
	}
	for i := range 3 {
		writeRandom(t, filepath.Join(mnt, fmt.Sprintf("new%d", i)), 300<<10)
	}
	run(t, "sync", "-f", mnt)
	now := fileSums(t, mnt)
	if maps.Equal(now, want) {
		t.Fatal("the origin filesystem did not change")
	}

	sfile, unfuseSnap := fuseAttach(t, d.uri("snap"), true)
	sdev, unloopSnap := loopAttach(t, sfile, true)
	if out, err := exec.Command("e2fsck", "-n", "-f", sdev).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -n -f on the snapshot: %v\n%s", err, out)
	}
	smnt, unmountSnap := mountDev(t, sdev, "ro")
	got := fileSums(t, smnt)
	if !maps.Equal(got, want) {
		t.Fatalf("snapshot files differ from the files at the create instant:\n got  %v\n want %v",
			slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}

	// Attached, the snapshot cannot be cleared without --force.
	_, errs, code := cli(t, "clear", "snap", "--control", d.ctl)
	if code != 1 || !strings.Contains(errs, `nbdsnap: snapshot "snap" is open by`) || !strings.Contains(errs, "use --force") {
		t.Fatalf("clear while attached: exit %d: %s", code, errs)
	}
	if _, err := os.Stat(backing); err != nil {
		t.Fatalf("refused clear touched the backing store: %v", err)
	}
	unmountSnap()
	unloopSnap()
	unfuseSnap()
	// nbdfuse has gone; the server notices its connections closing.
	waitFor(t, func() bool { return d.status(t).Snapshots[0].Conns == 0 })
	mustCLI(t, "clear", "snap", "--control", d.ctl)
	if _, err := os.Stat(backing); !os.IsNotExist(err) {
		t.Fatalf("backing store still there after clear: %v", err)
	}

	unmount()
	unloop()
	unfuse()
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	if out, err := exec.Command("e2fsck", "-n", "-f", origin).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -n -f on the origin after a clean stop: %v\n%s", err, out)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not met after 10s")
		}
	}
}
