package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// The tests in this file are about a snapshot's backing store over its
// life: a store damaged under a running daemon is never read as data, clear
// gets rid of the snapshot's own store only, and a block device that holds
// data is not taken as a store unless forced.

// storeCluster is the cluster size of every snapshot in this file, so that
// the store layout is known: an 8 MiB origin has 128 clusters, one metadata
// block (8192 … 16383), and DataStart 16384 rounded up to 65536.
const (
	storeCluster   = 64 << 10
	storeDataStart = 65536
)

// storeSnapshot returns the daemon's description of snapshot name, failing
// the test if it is not listed.
func storeSnapshot(t *testing.T, d *daemon, name string) control.SnapshotInfo {
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

// storeRecord decodes the state record DIR/state/snap-NAME.json.
func storeRecord(t *testing.T, d *daemon, name string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.state, "snap-"+name+".json"))
	if err != nil {
		t.Fatalf("state record of %q: %v", name, err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("state record of %q is not JSON: %v\n%s", name, err, b)
	}
	return m
}

// storeNoRecord fails the test if snapshot name still has a state record.
func storeNoRecord(t *testing.T, d *daemon, name string) {
	t.Helper()
	p := filepath.Join(d.state, "snap-"+name+".json")
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state record %s still there after clear: %v", p, err)
	}
}

// storeCopy runs nbdcopy on an export and returns what it wrote to stdout
// and how it ended. nbdcopy writes a pipe in order, so the output is the
// export's prefix that was read before any error.
func storeCopy(t *testing.T, uri string) (out []byte, stderr string, err error) {
	t.Helper()
	testenv.RequireTool(t, "nbdcopy")
	cmd := exec.Command("nbdcopy", uri, "-")
	var stdout, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &errb
	err = cmd.Run()
	return stdout.Bytes(), errb.String(), err
}

// storeNotServedAsDamaged checks that reading snapshot s of d fails and
// returns nothing that is not the snapshot's true content (want): neither
// nbdcopy of the whole export nor qemu-io of the copied range.
func storeNotServedAsDamaged(t *testing.T, d *daemon, s string, want []byte) {
	t.Helper()
	out, errs, err := storeCopy(t, d.uri(s))
	if err == nil {
		if bytes.Equal(out, want) {
			t.Fatalf("nbdcopy of snapshot %q succeeded although its store is damaged (and returned the right bytes, so the damage was not read?)", s)
		}
		t.Fatalf("nbdcopy of snapshot %q succeeded although its store is damaged, returning %d bytes that differ from the snapshot's content: the damage was served as data", s, len(out))
	}
	if !bytes.HasPrefix(want, out) {
		t.Fatalf("nbdcopy of snapshot %q failed (%v), but first wrote %d bytes that are not the snapshot's content: the damage was served as data", s, err, len(out))
	}
	t.Logf("nbdcopy of the damaged snapshot: %v: %s", err, strings.TrimSpace(errs))
	q, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 2M", d.uri(s)).CombinedOutput()
	if err == nil || !strings.Contains(string(q), "Input/output error") {
		t.Fatalf("qemu-io read 0 2M of snapshot %q whose store is damaged: %v, want an I/O error:\n%s", s, err, q)
	}
}

// storeNamesCluster reports whether msg names cluster k.
func storeNamesCluster(msg string, k int) bool {
	return regexp.MustCompile(fmt.Sprintf(`\bcluster %d\b`, k)).MatchString(msg)
}

// storeInvalidFor checks that snapshot s is listed invalid for a checksum
// mismatch of cluster, and that its record says so durably.
func storeInvalidFor(t *testing.T, d *daemon, s string, cluster int) {
	t.Helper()
	info := storeSnapshot(t, d, s)
	if info.State != control.StateInvalid || !strings.Contains(info.Reason, "checksum") || !storeNamesCluster(info.Reason, cluster) {
		t.Fatalf("status of %q: state %q, reason %q; want invalid, for the checksum of cluster %d", s, info.State, info.Reason, cluster)
	}
	// The writer records the invalidation: wait for it to reach the record.
	rec := storeRecord(t, d, s)
	for deadline := time.Now().Add(10 * time.Second); rec["invalid"] != true && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		rec = storeRecord(t, d, s)
	}
	if rec["invalid"] != true || !strings.Contains(fmt.Sprint(rec["reason"]), "checksum") {
		t.Fatalf("state record of %q: invalid %v, reason %q; want invalid for the checksum", s, rec["invalid"], rec["reason"])
	}
}

// storeOriginWorks checks that the origin export still takes writes and
// reads: its last MiB written and read back, its first 2 MiB still the
// pattern storeDamageSetup wrote.
func storeOriginWorks(t *testing.T, d *daemon) {
	t.Helper()
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 7M 1M", d.uri("data"))
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x44 7M 1M", "-c", "read -P 0x33 0 2M", d.uri("data"))
}

// storeDamageSetup serves a random 8 MiB origin, takes persistent snapshot
// s with a file store, and overwrites the origin's first 2 MiB, so that
// the store holds 32 clusters. It returns the daemon, the store's path,
// the origin's content at the create instant, and the cluster held in the
// store's first data slot.
func storeDamageSetup(t *testing.T) (d *daemon, store string, initial []byte, first int) {
	t.Helper()
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial = randomFile(t, origin, 8<<20)
	d = startDaemon(t, dir, origin)
	store = filepath.Join(dir, "s.cow")
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", store, "--cluster-size", "64K")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 2M", d.uri("data"))
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot differs from the origin at the create instant before any damage")
	}
	if n := storeSnapshot(t, d, "s").ClustersCopied; n != 32 {
		t.Fatalf("%d clusters copied, want 32", n)
	}

	// Where the data slots start: the store's own header says so (check
	// --json), and it must be what the format implies.
	out, _, _ := cli(t, "check", store, "--json")
	var rep struct{ Header struct{ DataStart int64 } }
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("check --json: %v\n%s", err, out)
	}
	if rep.Header.DataStart != storeDataStart {
		t.Fatalf("store's DataStart is %d, want %d", rep.Header.DataStart, storeDataStart)
	}

	// Which cluster the first data slot holds: one of the 32 copied.
	f, err := os.Open(store)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	slot := make([]byte, storeCluster)
	if _, err := f.ReadAt(slot, storeDataStart); err != nil {
		t.Fatalf("read the first data slot: %v", err)
	}
	first = -1
	for k := range 32 {
		if bytes.Equal(slot, initial[k*storeCluster:(k+1)*storeCluster]) {
			first = k
		}
	}
	if first < 0 {
		t.Fatalf("the first data slot at %d holds none of the copied clusters", storeDataStart)
	}
	return d, store, initial, first
}

// storeFlipByte inverts the byte at off in the file at path, as a bad
// sector or a stray write would change it.
func storeFlipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestDamagedStoreIsNotServed: a byte of a copied cluster flipped in the
// store file under the running daemon is caught by the cluster's checksum:
// reading the snapshot fails (nothing of the damaged cluster is returned),
// the snapshot is invalid, naming the cluster, in its status and durably in
// its record, `check` reports the mismatch, and the origin goes on working.
func TestDamagedStoreIsNotServed(t *testing.T) {
	d, store, initial, first := storeDamageSetup(t)
	storeFlipByte(t, store, storeDataStart+100)

	storeNotServedAsDamaged(t, d, "s", initial)
	storeInvalidFor(t, d, "s", first)
	storeOriginWorks(t, d)
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	// Stopped cleanly, the store says what it committed, so check finds the
	// damage (on a store still open, it cannot tell it from a batch torn in
	// flight).
	if out, errs, code := cli(t, "check", store); code != 1 || !strings.Contains(errs, "checksum") || !storeNamesCluster(errs, first) {
		t.Errorf("check of the damaged store: exit %d, stdout %q, stderr %q; want exit 1 naming cluster %d", code, out, errs, first)
	}
}

// TestTruncatedStoreIsNotServed: a store file truncated under the running
// daemon inside its first data slot is caught the same way; the clusters
// cut off are not read as zeros.
func TestTruncatedStoreIsNotServed(t *testing.T) {
	d, store, initial, first := storeDamageSetup(t)
	if err := os.Truncate(store, 70000); err != nil {
		t.Fatal(err)
	}
	storeNotServedAsDamaged(t, d, "s", initial)
	storeInvalidFor(t, d, "s", first)
	storeOriginWorks(t, d)
}

// TestDamagedStoreAfterCrash: the store damaged, then the daemon killed
// before anything read it: after an unclean shutdown the damaged batch looks
// like one torn in flight, which recovery drops. The origin tells them
// apart — it no longer holds the batch's clusters, which the daemon rewrites
// only after the batch was committed — so the restart lists the snapshot
// invalid ("store corrupt"), rather than serving it valid with the
// origin's new data where the damaged batch's clusters were.
func TestDamagedStoreAfterCrash(t *testing.T) {
	d, store, initial, _ := storeDamageSetup(t)
	d.kill9()
	storeFlipByte(t, store, storeDataStart+100)

	d = startDaemon(t, d.dir, d.origin)
	s := storeSnapshot(t, d, "s")
	if s.State != control.StateInvalid || !strings.Contains(s.Reason, "store corrupt") || !strings.Contains(s.Reason, "was committed") {
		t.Fatalf("snapshot after a crash with its newest batch damaged: %+v; want invalid, store corrupt", s)
	}
	storeNotServedAsDamaged(t, d, "s", initial)
	if rec := storeRecord(t, d, "s"); rec["invalid"] != true {
		t.Fatalf("record not marked invalid: %v", rec)
	}
	storeOriginWorks(t, d)
}

// storeFileSetup serves a random 8 MiB origin from dir and returns the
// daemon and the origin's content.
func storeFileSetup(t *testing.T, dir string) (*daemon, []byte) {
	t.Helper()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, 8<<20)
	return startDaemon(t, dir, origin), initial
}

// storeRestart stops d cleanly and starts it again on the same directory.
func storeRestart(t *testing.T, d *daemon) *daemon {
	t.Helper()
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	return startDaemon(t, d.dir, d.origin)
}

// TestClearKeepsWhatIsNotItsStore: clear deletes (or, on a device, wipes)
// the snapshot's own store, proven by its UUID, and nothing else: not a
// user's file put at the recorded path, not another snapshot's store.
func TestClearKeepsWhatIsNotItsStore(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")

	t.Run("user file at the path", func(t *testing.T) {
		dir := t.TempDir()
		d, _ := storeFileSetup(t, dir)
		p := filepath.Join(dir, "s.cow")
		mustCLI(t, "create", "s", "--control", d.ctl, "--backing", p)
		if err := d.stop(); err != nil {
			t.Fatalf("SIGTERM: %v", err)
		}
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		user := randomFile(t, p, 1<<20)
		d = startDaemon(t, dir, d.origin)
		before := storeSnapshot(t, d, "s")
		out := mustCLI(t, "clear", "s", "--control", d.ctl)
		if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, user) {
			t.Fatalf("clear of s changed the user's file at its recorded path %s: %v", p, err)
		}
		if before.State != control.StateInvalid || before.Served || !strings.Contains(before.Reason, "not an nbdsnap backing store") {
			t.Errorf("with a user's file at its store's path, s is %q (served %v): %q; want invalid, not an nbdsnap store",
				before.State, before.Served, before.Reason)
		}
		if !strings.HasPrefix(out, "s: cleared; kept "+p+":") || strings.Count(out, "\n") != 1 {
			t.Errorf("clear prints %q; want one line saying it kept %s", out, p)
		}
		storeNoRecord(t, d, "s")
	})

	t.Run("another snapshot's store at the path", func(t *testing.T) {
		dir := t.TempDir()
		d, initial := storeFileSetup(t, dir)
		p1, p2 := filepath.Join(dir, "s1.cow"), filepath.Join(dir, "s2.cow")
		mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", p1)
		mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", p2)
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 3M", d.uri("data"))
		if err := d.stop(); err != nil {
			t.Fatalf("SIGTERM: %v", err)
		}
		if err := os.Remove(p1); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(p2, p1); err != nil {
			t.Fatal(err)
		}
		d = startDaemon(t, dir, d.origin)
		s1, s2 := storeSnapshot(t, d, "s1"), storeSnapshot(t, d, "s2")
		out := mustCLI(t, "clear", "s1", "--control", d.ctl)
		for _, p := range []string{p1, p2} {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("clear of s1 removed %s, which holds s2's store: %v", p, err)
			}
		}
		if !bytes.Equal(readExport(t, d.uri("s2")), initial) {
			t.Fatal("s2 differs from the origin at its create instant after s1, whose path held s2's store, was cleared")
		}
		if s2.State != control.StateValid || !s2.Served {
			t.Errorf("s2 after the restart: %q (served %v): %q; want valid and served", s2.State, s2.Served, s2.Reason)
		}
		if s1.State != control.StateInvalid || s1.Served || !strings.Contains(s1.Reason, `snapshot "s2"`) {
			t.Errorf("s1, whose path holds s2's store, after the restart: %q (served %v): %q; want invalid, naming snapshot \"s2\"",
				s1.State, s1.Served, s1.Reason)
		}
		if !strings.HasPrefix(out, "s1: cleared; kept "+p1+":") || !strings.Contains(out, `snapshot "s2"`) {
			t.Errorf("clear prints %q; want it to say it kept %s, s2's store", out, p1)
		}
		storeNoRecord(t, d, "s1")
		if err := d.stop(); err != nil {
			t.Fatalf("SIGTERM: %v", err)
		}
		if out, errs, code := cli(t, "check", p2); code != 0 || !checkSaysOK(out) {
			t.Errorf("check %s (s2's store): exit %d: %s%s", p2, code, out, errs)
		}
	})

	t.Run("device store wiped", func(t *testing.T) {
		testenv.RequireRoot(t)
		dir := t.TempDir()
		img := filepath.Join(dir, "backing.img")
		run(t, "truncate", "-s", "16M", img)
		dev, _ := loopAttach(t, img, false)
		d, initial := storeFileSetup(t, dir)
		mustCLI(t, "create", "s", "--control", d.ctl, "--backing", dev)
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x66 0 3M", d.uri("data"))
		if !bytes.Equal(readExport(t, d.uri("s")), initial) {
			t.Fatal("snapshot on a device differs from the origin at the create instant")
		}
		out := mustCLI(t, "clear", "s", "--control", d.ctl)
		head := storeDeviceHead(t, dev)
		if !bytes.Equal(head, make([]byte, len(head))) {
			t.Fatalf("clear left the device's header slots as they were (first nonzero byte at %d); want both wiped", bytes.IndexFunc(head, func(r rune) bool { return r != 0 }))
		}
		if fi, err := os.Stat(dev); err != nil || fi.Mode()&os.ModeDevice == 0 {
			t.Fatalf("clear removed the backing device: %v", err)
		}
		if out != "s: cleared\n" {
			t.Errorf("clear prints %q; want %q", out, "s: cleared\n")
		}
		if out, errs, code := cli(t, "check", dev); code != 1 || !strings.Contains(errs, "not a backing store") {
			t.Errorf("check of the wiped device: exit %d: %s%s; want exit 1, not a backing store", code, out, errs)
		}
		storeNoRecord(t, d, "s")
		d = storeRestart(t, d)
		if st := d.status(t); len(st.Snapshots) != 0 {
			t.Fatalf("after clear and a restart, snapshots are listed: %+v", st.Snapshots)
		}
		// A wiped device counts as blank: no --force needed.
		mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", dev)
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x67 4M 1M", d.uri("data"))
		snap := storeSnapshot(t, d, "s2")
		if snap.State != control.StateValid || snap.ClustersCopied == 0 {
			t.Fatalf("s2 on the wiped device: %+v", snap)
		}
	})
}

// storeDeviceHead reads the two header slots (8192 bytes) of a device.
func storeDeviceHead(t *testing.T, dev string) []byte {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 8192)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatalf("read %s: %v", dev, err)
	}
	return b
}

// storeDeviceSum is the SHA-256 of a whole device.
func storeDeviceSum(t *testing.T, dev string) string {
	t.Helper()
	b, err := os.ReadFile(dev)
	if err != nil {
		t.Fatalf("read %s: %v", dev, err)
	}
	return sha(b)
}

// storeImage makes a 32 MiB image in dir, lets prepare put data on it, and
// attaches it to a loop device.
func storeImage(t *testing.T, dir, name string, prepare func(img string)) string {
	t.Helper()
	img := filepath.Join(dir, name+".img")
	run(t, "truncate", "-s", "32M", img)
	if prepare != nil {
		prepare(img)
	}
	dev, _ := loopAttach(t, img, false)
	return dev
}

// TestBackingDeviceWithDataRefused: a block device named as --backing that
// holds a file system, swap, a partition table or another snapshot's store
// is refused, with one line naming what it holds, and nothing changes: not
// the device, not the daemon's files, not its snapshots. With --force the
// device is used.
func TestBackingDeviceWithDataRefused(t *testing.T) {
	e2e(t)
	testenv.RequireRoot(t)
	for _, tool := range []string{"qemu-io", "mkfs.ext4", "mkswap", "sfdisk", "wipefs", "losetup"} {
		testenv.RequireTool(t, tool)
	}
	dir, other := t.TempDir(), t.TempDir()
	ext4 := storeImage(t, other, "ext4", func(img string) { run(t, "mkfs.ext4", "-q", "-F", img) })
	swap := storeImage(t, other, "swap", func(img string) { run(t, "mkswap", img) })
	dos := storeImage(t, other, "dos", func(img string) {
		cmd := exec.Command("sfdisk", "-q", img)
		cmd.Stdin = strings.NewReader("label: dos\n,,83\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("sfdisk %s: %v\n%s", img, err, out)
		}
	})
	store := storeImage(t, other, "store", nil)

	// Another daemon, of another origin and state directory, leaves the
	// store of its snapshot x on the last device.
	otherOrigin := filepath.Join(other, "origin.img")
	randomFile(t, otherOrigin, 4<<20)
	od := startDaemon(t, other, otherOrigin)
	mustCLI(t, "create", "x", "--control", od.ctl, "--backing", store)
	if err := od.stop(); err != nil {
		t.Fatalf("SIGTERM the other daemon: %v", err)
	}

	d, initial := storeFileSetup(t, dir)
	// Each case asks for a snapshot of its own name, so that a create that
	// wrongly succeeds does not make the next case fail for another reason.
	for _, tc := range []struct{ name, snap, dev, want string }{
		{"ext4", "s-ext4", ext4, "ext4"},
		{"swap", "s-swap", swap, "swap"},
		{"dos partition table", "s-dos", dos, "dos"},
		{"another snapshot's store", "s-store", store, `nbdsnap backing store of snapshot "x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sum := storeDeviceSum(t, tc.dev)
			before := disktest.Record(t, dir, other)
			_, errs, code := cli(t, "create", tc.snap, "--control", d.ctl, "--backing", tc.dev)
			if code != 1 || !strings.Contains(errs, tc.want) || strings.Count(errs, "\n") != 1 {
				t.Fatalf("create on %s holding %s: exit %d, stderr %q; want exit 1 and one line naming %q", tc.dev, tc.name, code, errs, tc.want)
			}
			if !strings.HasPrefix(errs, "nbdsnap: ") || !strings.Contains(errs, "backing device "+tc.dev+" holds ") || !strings.Contains(errs, "--force") {
				t.Errorf("refusal %q: want it to name the device and say --force uses it anyway", errs)
			}
			if storeDeviceSum(t, tc.dev) != sum {
				t.Errorf("a refused create changed %s", tc.dev)
			}
			before.Unchanged(t, disktest.Record(t, dir, other))
			if st := d.status(t); len(st.Snapshots) != 0 {
				t.Errorf("a refused create left snapshots: %+v", st.Snapshots)
			}
			if out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 0 512", d.uri(tc.snap)).CombinedOutput(); err == nil {
				t.Errorf("export %s exists after a refused create:\n%s", tc.snap, out)
			}
		})
	}

	// Forced, the ext4 device becomes the store, and the snapshot works.
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", ext4, "--force")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4M", d.uri("data"))
	if !bytes.Equal(readExport(t, d.uri("s")), initial) {
		t.Fatal("snapshot on a forced device differs from the origin at the create instant")
	}
}
