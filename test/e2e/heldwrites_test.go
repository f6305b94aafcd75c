package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/stallfs"
)

// heldOrderScript writes, on three libnbd connections to the same export,
// rounds of two overlapping writes on two connections (the second sent
// once the first was answered), then reads the range on the third: it
// must hold the second write over the first. Every round writes clusters
// not written before, so its writes are first writes under the snapshot:
// held (answered before their commit), the read waiting for them.
const heldOrderScript = `
import nbd, sys
uri, rounds = sys.argv[1], int(sys.argv[2])
hs = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
cs = 65536
for r in range(rounds):
    off = (r * 3 + 1) * cs
    a = bytes([r % 251 + 1]) * (2 * cs)
    b = bytes([r % 251 + 2]) * cs
    hs[0].pwrite(a, off)
    hs[1].pwrite(b, off + cs // 2)
    got = hs[2].pread(2 * cs, off)
    want = a[:cs // 2] + b + a[cs // 2 + cs:]
    if got != want:
        sys.exit("round %d: the read on a third connection does not show the second write over the first" % r)
for h in hs:
    h.flush()
    h.shutdown()
`

// TestHeldWritesAcrossConnections: with writes held, writes answered on
// one connection are seen, in the order answered, by reads on another
// (multi-conn), with the snapshot untouched by them.
func TestHeldWritesAcrossConnections(t *testing.T) {
	py, _, _, _, initial, d := heldSetup(t)
	run(t, py, "-c", heldOrderScript, d.uri("data"), "100")
	st := d.status(t)
	if st.HeldWrites.Total == 0 {
		t.Fatalf("no write was held (held_writes %+v): the store's syncs were too cheap for the test to mean anything", st.HeldWrites)
	}
	t.Logf("held_writes %+v", st.HeldWrites)
	if got := readExport(t, d.uri("s")); !bytes.Equal(got, initial) {
		t.Fatal("the snapshot changed under held writes")
	}
}

// TestHeldWritesKill9: writes answered while held (their commit stuck in a
// stalled store), then kill -9: the restart replays them from the
// held-writes log, in the order answered, through copy-on-write, so the
// origin holds every answered write and the snapshot is still its create
// instant.
func TestHeldWritesKill9(t *testing.T) {
	py, stall, dir, origin, initial, d := heldSetup(t)
	want := bytes.Clone(initial)
	copy(want, bytes.Repeat([]byte{1}, 65536))

	stall.Hold()
	// Overlapping writes on two connections, answered while the store
	// cannot commit: they can only be held.
	run(t, py, "-c", `
import nbd, sys
hs = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    hs.append(h)
hs[0].pwrite(b"\xa1" * (1 << 20), 8 << 20)
hs[1].pwrite(b"\xb2" * (1 << 20), (8 << 20) + (512 << 10))
hs[0].pwrite(b"\xc3" * 4096, 20 << 20)
`, d.uri("data"))
	copy(want[8<<20:], bytes.Repeat([]byte{0xa1}, 1<<20))
	copy(want[8<<20+512<<10:], bytes.Repeat([]byte{0xb2}, 1<<20))
	copy(want[20<<20:], bytes.Repeat([]byte{0xc3}, 4096))
	if st := d.status(t); st.HeldWrites.Writes == 0 {
		t.Fatalf("no write held with the store stalled: %+v", st.HeldWrites)
	}
	d.kill9()
	if got, err := os.ReadFile(origin); err != nil || bytes.Equal(got, want) {
		t.Fatalf("the held writes reached the origin before their commit (read: %v)", err)
	}
	stall.Resume()

	d2 := startDaemon(t, dir, origin)
	if got := readExport(t, d2.uri("data")); !bytes.Equal(got, want) {
		t.Fatalf("after the restart the origin export lacks answered writes (first difference at %d)", firstDiff(got, want))
	}
	if got := readExport(t, d2.uri("s")); !bytes.Equal(got, initial) {
		t.Fatalf("after the replay the snapshot differs from its create instant at %d", firstDiff(got, initial))
	}
	if !bytes.Contains([]byte(d2.log.String()), []byte("replayed the writes a killed daemon had answered")) {
		t.Errorf("the restart did not say it replayed held writes:\n%s", d2.log.String())
	}
	if err := d2.stop(); err != nil {
		t.Fatalf("clean stop: %v\n%s", err, d2.log.String())
	}
	if got, err := os.ReadFile(origin); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after a clean stop the origin file lacks answered writes (read: %v)", err)
	}
}

// firstDiff is the offset of the first byte where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// heldSetup starts a daemon on a 64 MiB random origin with a persistent
// snapshot s whose store is on a FUSE file system (stallfs), whose syncs
// cost more than the threshold for holding writes whatever /tmp is (a
// tmpfs would hold none), and writes and flushes one cluster, so that the
// snapshot knows what its syncs cost. initial is the origin at s's create
// instant.
func heldSetup(t *testing.T) (py string, stall *stallfs.FS, dir, origin string, initial []byte, d *daemon) {
	t.Helper()
	e2e(t)
	py = pythonNBD(t)
	stall = stallfs.Mount(t, t.TempDir())
	dir = t.TempDir()
	origin = filepath.Join(dir, "origin.img")
	initial = randomFile(t, origin, 64<<20)
	d = startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(stall.Dir(), "s.cow"))
	run(t, py, "-m", "nbd", "-u", d.uri("data"), "-c", `h.pwrite(b"\x01" * 65536, 0); h.flush()`)
	return py, stall, dir, origin, initial, d
}
