package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// These tests restart the daemon with the world around it changed: the
// file system of a backing store not mounted yet (TestStoreMissingAtRestart,
// TestWaitStores), another disk at the origin's path (TestOriginSwapped),
// and another --cache-size (TestCacheSizeOnReopen).

// TestStoreMissingAtRestart: a daemon started while its snapshot's backing
// store is missing (the store's file system not mounted yet, as at boot)
// serves the origin and lists the snapshot invalid. The origin is written
// meanwhile, so when the file system is back the snapshot must stay
// invalid for good: not served, its record marked invalid and, now that the
// store is reachable, its store's header too. clear then deletes the store,
// which provably is the snapshot's.
func TestStoreMissingAtRestart(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	store := restartNewStore(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 8<<20)
	want := bytes.Clone(initial) // the origin's content, as written below
	backing := filepath.Join(store.dir, "s.cow")

	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", backing, "--cluster-size", "64K")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", d.uri("data"))
	restartFill(want, 0x11, 0, 1<<20)
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot differs from the origin at the create instant")
	}
	restartStop(t, d)

	// Boot without the store's file system: the origin is served anyway,
	// without copy-on-write for s.
	store.umount(t)
	d = startDaemon(t, dir, origin)
	s := restartSnap(t, d, "s")
	if s.State != control.StateInvalid || s.Served {
		t.Fatalf("store missing at start: state %q, served %v; want invalid, not served (%+v)", s.State, s.Served, s)
	}
	if !strings.Contains(s.Reason, "could not be opened") || !strings.Contains(s.Reason, backing) {
		// Not fatal: the next restart is what this test is about.
		t.Errorf("store missing at start: reason %q; want it to say that %s could not be opened", s.Reason, backing)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 2M 1M", d.uri("data"))
	restartFill(want, 0x22, 2<<20, 1<<20)
	if !bytes.Equal(readExport(t, d.uri("data")), want) {
		t.Fatal("origin served without its snapshot's store does not hold the writes")
	}
	restartStop(t, d)

	// The file system is back, but the snapshot missed the write above.
	store.mount(t)
	d = startDaemon(t, dir, origin)
	s = restartSnap(t, d, "s")
	if s.State != control.StateInvalid || s.Served {
		t.Fatalf("store back after the origin was written without it: state %q, served %v; want invalid, not served: "+
			"its cluster at 2M is gone from the origin and not in the store (%+v)", s.State, s.Served, s)
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri("s")).CombinedOutput(); err == nil {
		t.Fatalf("invalid snapshot is served:\n%s", out)
	}
	// The store's header now says so too (check writes nothing; the
	// daemon does not hold a store it does not serve).
	out, errs, code := cli(t, "check", backing, "--json")
	var rep backstore.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("check --json: exit %d, not JSON (%v): %s%s", code, err, out, errs)
	}
	if rep.Header.State != backstore.StateInvalid || !strings.Contains(rep.Header.Reason, "could not be opened") {
		t.Fatalf("store header: state %v, reason %q; want invalid, saying the store could not be opened (check exit %d: %s)",
			rep.Header.State, rep.Header.Reason, code, errs)
	}
	if code != 0 {
		t.Fatalf("check of an invalidated store: exit %d: %s", code, errs)
	}
	rec, err := os.ReadFile(filepath.Join(d.state, "snap-s.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(rec, []byte(`"invalid": true`)) {
		t.Fatalf("state record of s is not marked invalid:\n%s", rec)
	}

	if out := mustCLI(t, "clear", "s", "--control", d.ctl); out != "s: cleared\n" {
		t.Fatalf("clear: %q; want the store deleted, nothing kept", out)
	}
	if _, err := os.Stat(backing); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("clear left the store in place: %v", err)
	}
	if len(d.status(t).Snapshots) != 0 {
		t.Fatalf("snapshot listed after clear: %+v", d.status(t).Snapshots)
	}
	restartStop(t, d)
}

// TestWaitStores: with --wait-stores, a daemon whose backing store is
// missing waits for it before it serves anything; the store's file system
// mounted a second later, the snapshot comes up valid and bit-exact. A
// store that never comes back is given up after the wait, and its snapshot
// is invalid as without the flag.
func TestWaitStores(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	store := restartNewStore(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 8<<20)
	backing := filepath.Join(store.dir, "s.cow")

	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", backing, "--cluster-size", "64K")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 5M 2M", d.uri("data"))
	restartStop(t, d)
	store.umount(t)

	d = spawnDaemon(t, dir, origin, "--wait-stores", "20s")
	time.Sleep(time.Second)
	select {
	case <-d.done:
		t.Fatalf("daemon exited while it should wait for its backing store: %v\n%s", d.waitErr, d.log.String())
	default:
	}
	restartNotServing(t, d)
	if !strings.Contains(d.log.String(), "waiting for backing stores") {
		t.Fatalf("daemon log does not say it waits for the backing store:\n%s", d.log.String())
	}
	store.mount(t)
	d.waitReady(15 * time.Second)
	s := restartSnap(t, d, "s")
	if s.State != control.StateValid || !s.Served || s.ClustersCopied == 0 {
		t.Fatalf("store mounted during the wait: %+v; want valid, served", s)
	}
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot reopened after the wait differs from the origin at the create instant")
	}
	if !strings.Contains(d.log.String(), "every backing store is there") {
		t.Errorf("daemon log does not say the wait ended with the store found:\n%s", d.log.String())
	}
	restartStop(t, d)

	// The store never comes back: the daemon starts after the wait.
	store.umount(t)
	start := time.Now()
	d = startDaemon(t, dir, origin, "--wait-stores", "1s")
	if took := time.Since(start); took < time.Second || took > 8*time.Second {
		t.Fatalf("--wait-stores 1s with the store missing: the daemon was ready after %v; want a little over 1s", took)
	}
	s = restartSnap(t, d, "s")
	if s.State != control.StateInvalid || s.Served || !strings.Contains(s.Reason, "could not be opened") ||
		!strings.Contains(s.Reason, backing) {
		t.Fatalf("store still missing after the wait: %+v; want invalid, not served, the store could not be opened", s)
	}
	if !strings.Contains(d.log.String(), "backing stores still missing") {
		t.Errorf("daemon log does not say the wait ended without the store:\n%s", d.log.String())
	}
	restartStop(t, d)
}

// TestWaitStoresInterrupted: a daemon stopped with SIGTERM while it waits
// for a missing backing store has not served the origin, so the origin
// missed no copy-on-write and every snapshot must be left as it was: with
// the store's file system mounted, the next start serves them all, intact,
// the one whose store was missing and the one whose store was there all
// along.
func TestWaitStoresInterrupted(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	store := restartNewStore(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 8<<20)

	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "late", "--control", d.ctl, "--backing", filepath.Join(store.dir, "late.cow"))
	mustCLI(t, "create", "here", "--control", d.ctl, "--backing", filepath.Join(dir, "here.cow"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", d.uri("data"))
	restartStop(t, d)
	store.umount(t)

	d = spawnDaemon(t, dir, origin, "--wait-stores", "20s")
	waitFor(t, func() bool {
		select {
		case <-d.done:
			t.Fatalf("daemon exited while it should wait for its backing store: %v\n%s", d.waitErr, d.log.String())
		default:
		}
		return strings.Contains(d.log.String(), "waiting for backing stores")
	})
	d.stop() // SIGTERM in the wait; how it exits is not the point here
	interrupted := d.log.String()

	store.mount(t)
	d = startDaemon(t, dir, origin)
	var bad []string
	for _, name := range []string{"late", "here"} {
		if s := restartSnap(t, d, name); s.State != control.StateValid || !s.Served {
			bad = append(bad, fmt.Sprintf("%s: state %q, served %v, reason %q", name, s.State, s.Served, s.Reason))
		}
	}
	if len(bad) > 0 {
		t.Fatalf("after a SIGTERM during --wait-stores (the origin never served), then a start with every store there, "+
			"snapshots are invalid; want them valid and served:\n  %s\nlog of the interrupted daemon:\n%s",
			strings.Join(bad, "\n  "), interrupted)
	}
	for _, name := range []string{"late", "here"} {
		if !bytes.Equal(readExport(t, d.uri(name)), initial) {
			t.Fatalf("snapshot %s differs from the origin at the create instant", name)
		}
	}
	restartStop(t, d)
}

// TestOriginSwapped: a loop device is the origin. Re-attached to another
// image (another disk at the origin's path), the daemon serves it but not
// the snapshot, naming both identities; with the right image back the
// snapshot is served again, intact. An image copied to a new file (the
// origin moved) is not taken for the origin until --accept-moved-origin,
// which makes the record adopt the new identity.
func TestOriginSwapped(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "losetup")
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	imgA, imgB, imgC := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img"), filepath.Join(dir, "c.img")
	origA := randomFile(t, imgA, 8<<20)
	origB := randomFile(t, imgB, 8<<20)
	loop := restartNewLoop(t, imgA)
	backing := filepath.Join(dir, "s.cow")

	d := startDaemon(t, dir, loop.dev)
	idA := d.status(t).OriginIdentity
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", backing)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 2M", "-c", "write -P 0x34 6M 1M", d.uri("data"))
	if !bytes.Equal(readExport(t, d.uri("s")), origA) {
		t.Fatal("snapshot differs from the origin at the create instant")
	}
	restartStop(t, d)

	// Another disk at the origin's path.
	loop.reattach(t, imgB)
	d = startDaemon(t, dir, loop.dev)
	s := restartSnap(t, d, "s")
	if s.State != control.StateInvalid || s.Served {
		t.Fatalf("origin path now holds another disk: snapshot state %q, served %v; want invalid, not served (%+v)", s.State, s.Served, s)
	}
	for _, w := range []string{"not the one this snapshot was taken of", "recorded:", "now:"} {
		if !strings.Contains(s.Reason, w) {
			t.Errorf("reason %q does not contain %q", s.Reason, w)
		}
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri("s")).CombinedOutput(); err == nil {
		t.Fatalf("snapshot of another disk is served:\n%s", out)
	}
	if !bytes.Equal(readExport(t, d.uri("data")), origB) {
		t.Fatal("the origin export does not serve the disk now at the origin's path")
	}
	idB := d.status(t).OriginIdentity
	if idA == "" || idA == idB {
		t.Errorf("origin_identity: %q with image A, %q with image B; want both set and different", idA, idB)
	}
	restartStop(t, d)

	// The snapshot's own disk is back: nothing happened to it meanwhile.
	loop.reattach(t, imgA)
	d = startDaemon(t, dir, loop.dev)
	restartWantServed(t, d, "s", origA, "image A back at the origin's path")
	if id := d.status(t).OriginIdentity; id != idA {
		t.Errorf("origin_identity with image A back: %q; want %q as before", id, idA)
	}
	restartStop(t, d)

	// The origin moved: the same data in another file.
	run(t, "cp", imgA, imgC)
	loop.reattach(t, imgC)
	d = startDaemon(t, dir, loop.dev)
	if s := restartSnap(t, d, "s"); s.Served || !strings.Contains(s.Reason, "not the one this snapshot was taken of") {
		t.Fatalf("origin copied to another file, without --accept-moved-origin: %+v; want not served", s)
	}
	restartStop(t, d)
	d = startDaemon(t, dir, loop.dev, "--accept-moved-origin")
	restartWantServed(t, d, "s", origA, "origin moved, with --accept-moved-origin")
	restartStop(t, d)
	d = startDaemon(t, dir, loop.dev)
	restartWantServed(t, d, "s", origA, "restart after the record adopted the moved origin")
	// Copy-on-write protects it on the new disk.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x35 3M 2M", d.uri("data"))
	if !bytes.Equal(readExport(t, d.uri("s")), origA) {
		t.Fatal("snapshot changed when the moved origin was written")
	}
	restartStop(t, d)
}

// TestCacheSizeOnReopen: a snapshot reopened by a restart gets the cache
// that --cache-size of that daemon asks for, as a new one would, not the
// engine's default. The cache shows in two ways: cache_bytes in status,
// and backpressure: a persistent snapshot's first write of more clusters
// than its cache holds waits for cache slots (cache_full_waits), one of
// fewer does not.
func TestCacheSizeOnReopen(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 8<<20)

	d := startDaemon(t, dir, origin, "--cache-size", "1M")
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"), "--cluster-size", "64K")
	created := restartSnap(t, d, "s").CacheBytes
	restartStop(t, d)

	// 1 MiB is 16 slots of 64 KiB: a 2 MiB first write (32 clusters, one
	// request) must wait for the writer to free slots. The engine's
	// default of 8 MiB (128 slots) would take it without waiting.
	d = startDaemon(t, dir, origin, "--cache-size", "1M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x41 0 2M", d.uri("data"))
	s := restartSnap(t, d, "s")
	if s.Stats.CacheFullWaits == 0 || s.ClustersCopied < 32 {
		t.Fatalf("reopened with --cache-size 1M, a 32-cluster first write never waited for a cache slot (%d clusters copied): "+
			"the cache is larger than 16 slots; stats %+v", s.ClustersCopied, s.Stats)
	}
	if s.CacheBytes != 1<<20 || created != 1<<20 {
		t.Fatalf("cache_bytes: %d when created, %d reopened, both with --cache-size 1M; want %d", created, s.CacheBytes, 1<<20)
	}
	restartStop(t, d)

	d = startDaemon(t, dir, origin, "--cache-size", "4M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 2M 2M", d.uri("data"))
	s = restartSnap(t, d, "s")
	if s.Stats.CacheFullWaits != 0 {
		t.Errorf("reopened with --cache-size 4M (64 slots), a 32-cluster first write waited for cache slots: stats %+v", s.Stats)
	}
	mustCLI(t, "create", "fresh", "--control", d.ctl, "--backing", filepath.Join(dir, "fresh.cow"), "--cluster-size", "64K")
	fresh := restartSnap(t, d, "fresh").CacheBytes
	if s.CacheBytes <= created || s.CacheBytes != fresh || fresh != 4<<20 {
		t.Fatalf("cache_bytes with --cache-size 4M: %d reopened, %d for a new snapshot (%d with 1M); want both %d",
			s.CacheBytes, fresh, created, 4<<20)
	}
	restartStop(t, d)
}

// restartStore is an ext4 file system on a loop device that a test mounts
// and unmounts at one directory: the file system of a backing store, which
// may be mounted late at boot.
type restartStore struct {
	dev, dir string
	mounted  bool
}

// restartNewStore makes a 32 MiB ext4 image, attaches it and mounts it.
// The cleanup unmounts it; it runs after the daemons started later have
// stopped (cleanups run last-registered first).
func restartNewStore(t *testing.T) *restartStore {
	t.Helper()
	testenv.RequireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		testenv.RequireTool(t, tool)
	}
	img := filepath.Join(t.TempDir(), "store.img")
	run(t, "truncate", "-s", "32M", img)
	run(t, "mkfs.ext4", "-q", "-F", img)
	dev, _ := loopAttach(t, img, false)
	s := &restartStore{dev: dev, dir: t.TempDir()}
	t.Cleanup(func() {
		if !s.mounted {
			return
		}
		if out, err := exec.Command("umount", s.dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", s.dir, err, out)
			exec.Command("umount", "-l", s.dir).Run()
		}
	})
	s.mount(t)
	return s
}

func (s *restartStore) mount(t *testing.T) {
	t.Helper()
	run(t, "mount", s.dev, s.dir)
	s.mounted = true
}

func (s *restartStore) umount(t *testing.T) {
	t.Helper()
	run(t, "umount", s.dir)
	s.mounted = false
}

// restartLoop is a loop device that a test re-attaches to other images at
// the same path.
type restartLoop struct {
	dev, file string // file is "" while detached
}

// restartNewLoop attaches file to a free loop device; the cleanup detaches
// whatever this test attached last.
func restartNewLoop(t *testing.T, file string) *restartLoop {
	t.Helper()
	l := &restartLoop{dev: strings.TrimSpace(run(t, "losetup", "-f", "--show", file)), file: file}
	t.Cleanup(func() {
		if l.file != "" {
			exec.Command("losetup", "-d", l.dev).Run()
		}
	})
	return l
}

// reattach detaches the loop device and attaches file to the same device.
// The device may take a moment to be free again; if another program took
// it in between, the test cannot go on at this path and says so.
func (l *restartLoop) reattach(t *testing.T, file string) {
	t.Helper()
	run(t, "losetup", "-d", l.dev)
	l.file = ""
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, err := exec.Command("losetup", l.dev, file).CombinedOutput()
		if err == nil {
			l.file = file
			return
		}
		if back, _ := exec.Command("losetup", "-n", "-O", "BACK-FILE", l.dev).Output(); len(bytes.TrimSpace(back)) > 0 {
			t.Fatalf("loop device %s was taken by another program (it now holds %s) while this test had it detached; run the test again",
				l.dev, bytes.TrimSpace(back))
		}
		if time.Now().After(deadline) {
			t.Fatalf("losetup %s %s: %v: %s", l.dev, file, err, out)
		}
	}
}

// restartNotServing fails the test unless d, waiting for its backing
// store, says so on its control socket (and nothing else) and starts no NBD
// handshake (its NBD socket exists, so connections wait in the backlog).
func restartNotServing(t *testing.T, d *daemon) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if st, err := control.NewClient(d.ctl).Status(ctx); !errors.Is(err, control.ErrUnavailable) ||
		!strings.Contains(err.Error(), "waiting up to") {
		t.Fatalf("status while the daemon waits for its backing store: %+v, %v; want it to say it is waiting", st, err)
	}
	c, err := net.Dial("unix", d.sock)
	if err != nil {
		return // not even listening
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(make([]byte, 8)); err == nil || n > 0 {
		t.Fatalf("daemon started an NBD handshake (%d bytes) while it waits for its backing store", n)
	}
}

// restartSnap returns the named snapshot from d's status --json.
func restartSnap(t *testing.T, d *daemon, name string) control.SnapshotInfo {
	t.Helper()
	st := d.status(t)
	for _, s := range st.Snapshots {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("snapshot %q not listed: %+v", name, st.Snapshots)
	return control.SnapshotInfo{}
}

// restartWantServed fails the test unless snapshot name is valid, served
// and holds want.
func restartWantServed(t *testing.T, d *daemon, name string, want []byte, when string) {
	t.Helper()
	if s := restartSnap(t, d, name); s.State != control.StateValid || !s.Served {
		t.Fatalf("%s: snapshot %q state %q, served %v, reason %q; want valid, served", when, name, s.State, s.Served, s.Reason)
	}
	if !bytes.Equal(readExport(t, d.uri(name)), want) {
		t.Fatalf("%s: snapshot %q differs from the origin at the create instant", when, name)
	}
}

// restartStop stops d with SIGTERM and fails the test unless it exits 0.
func restartStop(t *testing.T, d *daemon) {
	t.Helper()
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.log.String())
	}
}

// restartFill sets b[off:off+n] to p, as qemu-io's write -P p off n does.
func restartFill(b []byte, p byte, off, n int) {
	for i := off; i < off+n; i++ {
		b[i] = p
	}
}
