package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/stallfs"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// `nbdsnap rollback`, black-box: the CLI, real origin and store files,
// nbdcopy, qemu-io and libnbd from Python for the I/O, and kill -9.
//
// Every test draws its data from a fixed seed (printed); NBDSNAP_E2E_SEED=N
// replays a run with another. The throttled rollbacks (--rate) copy 4 to
// 16 MiB back at 1 to 4 MiB/s, so that each runs for one to four seconds,
// long enough to look at it while it runs, and the whole file stays well
// under a minute.

// rbCluster is the cluster size of the tests' snapshots (the default).
const rbCluster = 64 << 10

// rbRand returns the test's random source, seeded with def unless
// NBDSNAP_E2E_SEED says otherwise, and logs the seed.
func rbRand(t *testing.T, def uint64) *rand.Rand {
	t.Helper()
	seed := def
	if s := os.Getenv("NBDSNAP_E2E_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("NBDSNAP_E2E_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (NBDSNAP_E2E_SEED=%d replays it)", seed, seed)
	return rand.New(rand.NewPCG(seed, 0x7b))
}

// rbRequire skips unless the tools the rollback tests use are installed.
func rbRequire(t *testing.T) {
	t.Helper()
	e2e(t)
	for _, tool := range []string{"nbdcopy", "qemu-io"} {
		testenv.RequireTool(t, tool)
	}
	incRequireLibnbd(t)
}

// rbStart makes an origin of size random bytes in a fresh directory (with
// a stores/ directory for the backing files), starts a daemon on it with
// the environment given, and returns the daemon and the origin's content.
func rbStart(t *testing.T, r *rand.Rand, size int, env ...string) (*daemon, []byte) {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	b := make([]byte, size)
	incRandomBytes(r, b)
	if err := os.WriteFile(origin, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "stores"), 0o700); err != nil {
		t.Fatal(err)
	}
	if len(env) > 0 {
		return crashStartAt(t, dir, origin, env[0]), b
	}
	return startDaemon(t, dir, origin), b
}

// rbStore is where snapshot name's store goes.
func rbStore(d *daemon, name string) string { return filepath.Join(d.dir, "stores", name+".cow") }

// rbCreate creates snapshot name with its store in the stores directory.
func rbCreate(t *testing.T, d *daemon, name string, extra ...string) {
	t.Helper()
	mustCLI(t, append([]string{"create", name, "--control", d.ctl, "--backing", rbStore(d, name)}, extra...)...)
}

// rbRestart starts a daemon again on d's directory and origin.
func rbRestart(t *testing.T, d *daemon) *daemon {
	t.Helper()
	return startDaemon(t, d.dir, d.origin)
}

// rbWrite is data to write at off.
type rbWrite struct {
	off  int64
	data []byte
}

// rbWritePy writes the chunks of a data file at the offsets a JSON list of
// [offset, length] pairs gives, in order, on one libnbd connection, and
// flushes.
const rbWritePy = `
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read()
pos = 0
for off, n in json.load(open(sys.argv[3])):
    h.pwrite(data[pos:pos + n], off)
    pos += n
h.flush()
h.shutdown()
`

// rbApply writes ws through export with libnbd (then flushes) and into the
// model cur (nil: none).
func rbApply(t *testing.T, d *daemon, export string, cur []byte, ws []rbWrite) {
	t.Helper()
	py := incRequireLibnbd(t)
	dir := t.TempDir()
	var data []byte
	var list [][2]int64
	for _, w := range ws {
		data = append(data, w.data...)
		list = append(list, [2]int64{w.off, int64(len(w.data))})
		if cur != nil {
			copy(cur[w.off:], w.data)
		}
	}
	js, _ := json.Marshal(list)
	for name, b := range map[string][]byte{"write.py": []byte(rbWritePy), "data": data, "list.json": js} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run(t, py, filepath.Join(dir, "write.py"), d.uri(export), filepath.Join(dir, "data"), filepath.Join(dir, "list.json"))
}

// rbScatter makes k whole-cluster writes of random data to k distinct
// clusters drawn at random from an origin of size bytes, and returns them
// with the clusters, sorted: the set a snapshot taken before copies.
func rbScatter(r *rand.Rand, size, k int) ([]rbWrite, []int) {
	clusters := r.Perm(size / rbCluster)[:k]
	slices.Sort(clusters)
	ws := make([]rbWrite, k)
	for i, c := range clusters {
		b := make([]byte, rbCluster)
		incRandomBytes(r, b)
		ws[i] = rbWrite{off: int64(c) * rbCluster, data: b}
	}
	return ws, clusters
}

// rbRandomWrites makes n writes of random data at random offsets, 1 byte
// to 300 KiB long (so that many are not aligned and some cross clusters).
func rbRandomWrites(r *rand.Rand, size, n int) []rbWrite {
	ws := make([]rbWrite, n)
	for i := range ws {
		l := 1 + r.IntN(300<<10)
		off := r.IntN(size - l)
		b := make([]byte, l)
		incRandomBytes(r, b)
		ws[i] = rbWrite{off: int64(off), data: b}
	}
	return ws
}

// rbOp is a qemu-io write of a pattern, or of zeroes, at [off, off+n).
type rbOp struct {
	off, n  int
	pattern byte
	zero    bool
}

func (o rbOp) String() string {
	if o.zero {
		return fmt.Sprintf("write -z %d %d", o.off, o.n)
	}
	return fmt.Sprintf("write -P %d %d %d", o.pattern, o.off, o.n)
}

// rbQemu sends ops to the origin export with one qemu-io, then a flush,
// and applies them to the model cur.
func rbQemu(t *testing.T, d *daemon, cur []byte, ops ...rbOp) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, o := range ops {
		args = append(args, "-c", o.String())
		for i := o.off; i < o.off+o.n; i++ {
			cur[i] = o.pattern
			if o.zero {
				cur[i] = 0
			}
		}
	}
	run(t, "qemu-io", append(args, "-c", "flush", d.uri("data"))...)
}

// rbSame fails the test unless got equals want, naming the first byte
// (and cluster) that differs.
func rbSame(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	i := 0
	for got[i] == want[i] {
		i++
	}
	n := 0
	for j := range got {
		if got[j] != want[j] {
			n++
		}
	}
	t.Fatalf("%s: differs from what it should hold at byte %d (cluster %d: %#02x, want %#02x); %d bytes differ (sha256 %s, want %s)",
		what, i, i/rbCluster, got[i], want[i], n, sha(got), sha(want))
}

// rbRollback runs `nbdsnap rollback` against d.
func rbRollback(t *testing.T, d *daemon, args ...string) (string, string, int) {
	t.Helper()
	return cli(t, append([]string{"rollback", "--control", d.ctl}, args...)...)
}

// rbStatus is the rollback status --json shows (nil for none).
func rbStatus(t *testing.T, d *daemon) *control.RollbackStatus {
	t.Helper()
	return d.status(t).Rollback
}

// rbRunning fails the test unless a rollback to snap is running with
// bytes still to copy, and returns its status.
func rbRunning(t *testing.T, d *daemon, snap, when string) control.RollbackStatus {
	t.Helper()
	st := rbStatus(t, d)
	if st == nil || st.Snapshot != snap || st.State != control.RollbackRunning || st.RemainingBytes <= 0 || st.Error != "" {
		t.Fatalf("%s: rollback status %+v; want a rollback to %s running with bytes left to copy", when, st, snap)
	}
	return *st
}

// rbWaitDone polls status --json until the rollback is done, failing the
// test if it fails, remaining_bytes increases, or it takes longer than
// within; it returns the last status.
func rbWaitDone(t *testing.T, d *daemon, within time.Duration) control.RollbackStatus {
	t.Helper()
	last := int64(-1)
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		st := rbStatus(t, d)
		if st == nil {
			t.Fatal("status shows no rollback while one should be running or done")
		}
		if last >= 0 && st.RemainingBytes > last {
			t.Fatalf("remaining_bytes went up from %d to %d", last, st.RemainingBytes)
		}
		last = st.RemainingBytes
		switch st.State {
		case control.RollbackDone:
			if st.RemainingBytes != 0 || st.Finished.IsZero() {
				t.Fatalf("rollback done: %+v; want remaining 0 and a finish time", st)
			}
			return *st
		case control.RollbackFailed:
			t.Fatalf("rollback failed: %+v", st)
		}
		if time.Now().After(deadline) {
			t.Fatalf("rollback not done after %v: %+v", within, st)
		}
	}
}

// rbSnap returns snapshot name's status, and whether it is listed.
func rbSnap(t *testing.T, d *daemon, name string) (control.SnapshotInfo, bool) {
	t.Helper()
	for _, s := range d.status(t).Snapshots {
		if s.Name == name {
			return s, true
		}
	}
	return control.SnapshotInfo{}, false
}

// rbGone fails the test if snapshot name is listed, recorded or its store
// is still there.
func rbGone(t *testing.T, d *daemon, name string) {
	t.Helper()
	if s, ok := rbSnap(t, d, name); ok {
		t.Fatalf("snapshot %q still listed: %+v", name, s)
	}
	for _, p := range []string{rbStore(d, name), filepath.Join(d.state, "snap-"+name+".json")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s is still there (%v)", p, err)
		}
	}
}

// rbProgressFile is the rollback's progress file in d's state directory.
func rbProgressFile(d *daemon) string { return filepath.Join(d.state, "rollback.progress") }

// rbNoProgress fails the test if the progress file exists.
func rbNoProgress(t *testing.T, d *daemon, when string) {
	t.Helper()
	if _, err := os.Stat(rbProgressFile(d)); !os.IsNotExist(err) {
		t.Fatalf("%s: %s exists (%v)", when, rbProgressFile(d), err)
	}
}

// rbFile reads a file whole.
func rbFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rbStop stops d with SIGTERM, which must exit 0.
func rbStop(t *testing.T, d *daemon) {
	t.Helper()
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, d.log.String())
	}
}

// rbRefusedStart spawns a daemon on d's directory and origin that must
// refuse to start; it returns what it printed.
func rbRefusedStart(t *testing.T, d *daemon) string {
	t.Helper()
	nd := spawnDaemon(t, d.dir, d.origin)
	select {
	case <-nd.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("daemon still running 15s after it should have refused to start:\n%s", nd.log.String())
	}
	if nd.waitErr == nil {
		t.Fatalf("daemon exited 0; want a refusal:\n%s", nd.log.String())
	}
	return nd.log.String()
}

// rbExitError is the error line `nbdsnap serve` ended with ("nbdsnap:
// ..."), from its output.
func rbExitError(t *testing.T, log string) string {
	t.Helper()
	for _, l := range strings.Split(log, "\n") {
		if strings.HasPrefix(l, "nbdsnap: ") {
			return l
		}
	}
	t.Fatalf("no error line in the output of a daemon that refused to start:\n%s", log)
	return ""
}

// rbScatterSetup is the setup of the throttled tests: an origin of size
// random bytes with snapshot s1 of it, and then k random clusters
// overwritten (the set s1 copied, and a rollback copies back). It returns
// the daemon, s1's image, the origin's content now and the clusters.
func rbScatterSetup(t *testing.T, r *rand.Rand, size, k int) (*daemon, []byte, []byte, []int) {
	t.Helper()
	d, s1 := rbStart(t, r, size)
	rbCreate(t, d, "s1")
	cur := bytes.Clone(s1)
	ws, clusters := rbScatter(r, size, k)
	rbApply(t, d, "data", cur, ws)
	rbSame(t, "origin export after the writes", readExport(t, d.uri("data")), cur)
	if s, _ := rbSnap(t, d, "s1"); s.ClustersCopied != int64(k) {
		t.Fatalf("s1 copied %d clusters; want the %d written", s.ClustersCopied, k)
	}
	return d, s1, cur, clusters
}

// TestRollbackContent: snapshot s1, a full overwrite of the origin with
// nbdcopy, snapshot s2, random writes through libnbd; `rollback s1 --wait`
// answers, and then the origin export reads exactly s1's image, s1's
// export too, and s2's export is unchanged. Once the daemon stops, the
// origin file itself is s1's image; after a restart every export still
// reads the same.
func TestRollbackContent(t *testing.T) {
	rbRequire(t)
	const size = 32 << 20
	r := rbRand(t, 1)
	d, s1 := rbStart(t, r, size)
	rbCreate(t, d, "s1")

	full := make([]byte, size)
	incRandomBytes(r, full)
	img := filepath.Join(d.dir, "full.img")
	if err := os.WriteFile(img, full, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "nbdcopy", img, d.uri("data"))
	rbSame(t, "origin export after nbdcopy", readExport(t, d.uri("data")), full)
	rbCreate(t, d, "s2")
	cur := bytes.Clone(full)
	rbApply(t, d, "data", cur, rbRandomWrites(r, size, 40))
	rbSame(t, "origin export after the writes", readExport(t, d.uri("data")), cur)

	start := time.Now()
	out, errs, code := rbRollback(t, d, "s1", "--wait")
	took := time.Since(start)
	if code != 0 {
		t.Fatalf("rollback s1 --wait: exit %d: %s", code, errs)
	}
	want := "s1: rollback started: the origin shows s1 now; 32 MiB to copy back\ns1: rollback complete\n"
	if out != want {
		t.Errorf("rollback s1 --wait printed %q; want %q", out, want)
	}
	t.Logf("rollback of 32 MiB took %v", took.Round(time.Millisecond))
	st := rbStatus(t, d)
	if st == nil || st.State != control.RollbackDone || st.Snapshot != "s1" || st.TotalBytes != size || st.RemainingBytes != 0 || st.Consume {
		t.Fatalf("status after the rollback: %+v; want done, s1, %d bytes total, none left", st, size)
	}
	rbSame(t, "origin export after rollback s1", readExport(t, d.uri("data")), s1)
	rbSame(t, "s1's export after the rollback", readExport(t, d.uri("s1")), s1)
	rbSame(t, "s2's export after the rollback", readExport(t, d.uri("s2")), full)
	for _, name := range []string{"s1", "s2"} {
		if s, ok := rbSnap(t, d, name); !ok || s.State != control.StateValid || !s.Served {
			t.Fatalf("snapshot %s after the rollback: %+v; want valid and served", name, s)
		}
	}
	rbNoProgress(t, d, "after the rollback")
	rbStop(t, d)
	rbSame(t, "origin file after the rollback and a stop", rbFile(t, d.origin), s1)

	d = rbRestart(t, d)
	if st := rbStatus(t, d); st != nil {
		t.Fatalf("status after a restart shows a rollback: %+v", st)
	}
	rbSame(t, "origin export after a restart", readExport(t, d.uri("data")), s1)
	rbSame(t, "s1's export after a restart", readExport(t, d.uri("s1")), s1)
	rbSame(t, "s2's export after a restart", readExport(t, d.uri("s2")), full)
}

// TestRollbackAtomicView: while a throttled rollback runs (status says
// running with bytes left before and after), every nbdcopy of the whole
// origin export reads exactly s1's image, though most of it is not copied
// back yet; remaining_bytes, sampled all along, never increases, and
// total_bytes is exactly the clusters s1 copied.
func TestRollbackAtomicView(t *testing.T) {
	rbRequire(t)
	const size, k = 32 << 20, 256 // 16 MiB to copy back, at 4 MiB/s
	r := rbRand(t, 2)
	d, s1, _, _ := rbScatterSetup(t, r, size, k)

	if _, errs, code := rbRollback(t, d, "s1", "--rate", "4M"); code != 0 {
		t.Fatalf("rollback s1 --rate 4M: exit %d: %s", code, errs)
	}
	first := rbRunning(t, d, "s1", "just after the rollback answered")
	if first.TotalBytes != k*rbCluster || first.Rate != 4<<20 {
		t.Fatalf("rollback status %+v; want %d bytes total (the %d clusters s1 copied), rate %d", first, k*rbCluster, k, 4<<20)
	}
	last := first.RemainingBytes
	samples, during := 1, 0
	sample := func() *control.RollbackStatus {
		st := rbStatus(t, d)
		samples++
		if st == nil || st.Snapshot != "s1" || st.TotalBytes != first.TotalBytes {
			t.Fatalf("rollback status %+v during the rollback", st)
		}
		if st.RemainingBytes > last {
			t.Fatalf("remaining_bytes went up from %d to %d (sample %d)", last, st.RemainingBytes, samples)
		}
		last = st.RemainingBytes
		return st
	}
	running := func(st *control.RollbackStatus) bool {
		return st.State == control.RollbackRunning && st.RemainingBytes > 0
	}
	for {
		before := sample()
		if !running(before) {
			break
		}
		got := readExport(t, d.uri("data"))
		after := sample()
		rbSame(t, fmt.Sprintf("origin export during the rollback (remaining %d before the read, %d after)", before.RemainingBytes, after.RemainingBytes), got, s1)
		if running(after) {
			during++
		}
		for range 5 {
			sample()
		}
	}
	t.Logf("%d reads of the whole origin export while the rollback ran, %d status samples", during, samples)
	if during < 3 {
		t.Fatalf("only %d reads fell wholly within the rollback; want at least 3", during)
	}
	st := rbWaitDone(t, d, 30*time.Second)
	if st.TotalBytes != first.TotalBytes {
		t.Fatalf("done: %+v", st)
	}
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), s1)
	rbStop(t, d)
	rbSame(t, "origin file after the rollback", rbFile(t, d.origin), s1)
}

// TestRollbackWritesDuring: writes through the origin export while a
// throttled rollback runs, several into clusters not copied back yet
// (whole, partial and unaligned, write-zeroes, one across a copied and an
// uncopied cluster), others into clusters copied back or never copied:
// the origin reads s1's image plus exactly those writes at once, after the
// copy and in the origin file after a stop; s1's export stays s1's image.
func TestRollbackWritesDuring(t *testing.T) {
	rbRequire(t)
	const size, k = 32 << 20, 256
	r := rbRand(t, 3)
	d, s1, _, clusters := rbScatterSetup(t, r, size, k)
	copied := map[int]bool{}
	for _, c := range clusters {
		copied[c] = true
	}
	// A copied cluster in the upper half whose next one was not copied.
	across := -1
	for _, c := range clusters[k/2 : k-4] {
		if !copied[c+1] && c+1 < size/rbCluster {
			across = c
			break
		}
	}
	if across < 0 {
		t.Fatal("no copied cluster followed by an uncopied one in the upper half; change the seed")
	}
	notCopied := -1
	for c := 0; c < size/rbCluster; c++ {
		if !copied[c] {
			notCopied = c
			break
		}
	}

	if _, errs, code := rbRollback(t, d, "s1", "--rate", "4M"); code != 0 {
		t.Fatalf("rollback s1 --rate 4M: exit %d: %s", code, errs)
	}
	rbRunning(t, d, "s1", "just after the rollback answered")
	cur := bytes.Clone(s1)
	at := func(c, in int) int { return c*rbCluster + in }
	pending := []int{clusters[k-1], clusters[k-2], clusters[k-3], across}
	ops := []rbOp{
		{off: at(clusters[k-1], 0), n: rbCluster, pattern: 0xa1},     // a whole cluster not copied back
		{off: at(clusters[k-2], 1000), n: 3000, pattern: 0xa2},       // part of one
		{off: at(clusters[k-3], 512), n: 4096, zero: true},           // write-zeroes into one
		{off: at(across, 60000), n: 20000, pattern: 0xa3},            // across a copied and an uncopied cluster
		{off: at(clusters[0], 7), n: 100, pattern: 0xa4},             // the first cluster, most likely copied back already
		{off: at(notCopied, 12345), n: 70000, pattern: 0xa5},         // clusters s1 never copied
		{off: at(clusters[k-1], rbCluster-10), n: 10, pattern: 0xa6}, // over the first write
	}
	rbQemu(t, d, cur, ops...)
	st := rbRunning(t, d, "s1", "after the writes")
	// The copier goes in cluster order and remaining_bytes never grows:
	// at least the copied clusters from the lowest written to that were
	// not written are still to copy, or the copier had passed it before
	// the writes.
	low := slices.Min(pending)
	var after int64
	for _, c := range clusters {
		if c >= low && !slices.Contains(pending, c) {
			after += rbCluster
		}
	}
	if st.RemainingBytes < after {
		t.Fatalf("remaining_bytes %d after the writes; the %d bytes of copied clusters from %d on were still to copy back if the writes came before the copier", st.RemainingBytes, after, low)
	}
	rbSame(t, "origin export just after the writes", readExport(t, d.uri("data")), cur)
	// More writes, random, anywhere, while it goes on.
	rbApply(t, d, "data", cur, rbRandomWrites(r, size, 20))
	rbRunning(t, d, "s1", "after the random writes")
	rbSame(t, "origin export during the rollback", readExport(t, d.uri("data")), cur)

	rbWaitDone(t, d, 30*time.Second)
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), cur)
	rbSame(t, "s1's export after the rollback", readExport(t, d.uri("s1")), s1)
	rbStop(t, d)
	rbSame(t, "origin file after the rollback", rbFile(t, d.origin), cur)
}

// rbHoldPy holds a connection to an export open until a line comes on
// stdin, then reads the export whole on it and prints its SHA-256.
const rbHoldPy = `
import hashlib, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
print("ready", flush=True)
sys.stdin.readline()
m = hashlib.sha256()
off = 0
while off < size:
    n = min(1 << 20, size - off)
    m.update(h.pread(n, off))
    off += n
print(m.hexdigest(), flush=True)
h.shutdown()
`

// TestRollbackRefusedWhileOpen: with an NBD client holding the origin
// export open, rollback exits 1 saying to unmount or detach, or use
// --force, and changes nothing; with --force it rolls back, and the
// client's connection reads s1's image.
func TestRollbackRefusedWhileOpen(t *testing.T) {
	rbRequire(t)
	const size = 8 << 20
	r := rbRand(t, 4)
	d, s1 := rbStart(t, r, size)
	rbCreate(t, d, "s1")
	cur := bytes.Clone(s1)
	rbApply(t, d, "data", cur, rbRandomWrites(r, size, 10))

	held := holdLibnbd(t, d.dir, "hold.py", rbHoldPy, d.uri("data"))
	if n := d.status(t).Conns; n != 1 {
		t.Fatalf("status shows %d connections to the origin; want the one held", n)
	}

	_, errs, code := rbRollback(t, d, "s1")
	if code != 1 || !strings.Contains(errs, "open by 1 NBD client(s)") || !strings.Contains(errs, "unmount") ||
		!strings.Contains(errs, "detach") || !strings.Contains(errs, "--force") {
		t.Fatalf("rollback with the origin open: exit %d, stderr %q; want exit 1 saying to unmount/detach or use --force", code, errs)
	}
	if st := rbStatus(t, d); st != nil {
		t.Fatalf("a refused rollback shows in status: %+v", st)
	}
	rbNoProgress(t, d, "after a refused rollback")
	rbSame(t, "origin export after a refused rollback", readExport(t, d.uri("data")), cur)

	if _, errs, code := rbRollback(t, d, "s1", "--force", "--wait"); code != 0 {
		t.Fatalf("rollback --force --wait with the origin open: exit %d: %s", code, errs)
	}
	rbSame(t, "origin export after rollback --force", readExport(t, d.uri("data")), s1)
	if got := held(); got != sha(s1) {
		t.Fatalf("the connection held across the rollback reads sha256 %s; want s1's %s", got, sha(s1))
	}
}

// TestRollbackRefusals: a rollback to a transient snapshot, to a bookmark
// and to a missing snapshot exits 1 saying why, and starts nothing. While
// a throttled rollback runs: create exits 1 and creates nothing, clear
// and clear --bookmark of the source exit 1 and keep it, a second
// rollback exits 1. Once it is done, all of them work again.
func TestRollbackRefusals(t *testing.T) {
	rbRequire(t)
	const size, k = 8 << 20, 64 // 4 MiB to copy back at 1 MiB/s
	r := rbRand(t, 5)
	d, s1, _, _ := rbScatterSetup(t, r, size, k)
	rbCreate(t, d, "t1", "--transient")
	rbCreate(t, d, "b1")
	if out := mustCLI(t, "clear", "b1", "--bookmark", "--control", d.ctl); !strings.Contains(out, "kept as a bookmark") {
		t.Fatalf("clear b1 --bookmark: %q", out)
	}
	cur := readExport(t, d.uri("data"))

	for _, tc := range []struct{ snap, want string }{
		{"t1", `"t1" is transient`},
		{"b1", `"b1" is a bookmark`},
		{"nope", `snapshot "nope": not found`},
	} {
		_, errs, code := rbRollback(t, d, tc.snap, "--force")
		if code != 1 || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Fatalf("rollback %s: exit %d, stderr %q; want exit 1 and one line containing %q", tc.snap, code, errs, tc.want)
		}
		if st := rbStatus(t, d); st != nil {
			t.Fatalf("refused rollback %s shows in status: %+v", tc.snap, st)
		}
		rbNoProgress(t, d, "after rollback "+tc.snap)
	}
	rbSame(t, "origin export after the refused rollbacks", readExport(t, d.uri("data")), cur)

	if _, errs, code := rbRollback(t, d, "s1", "--rate", "1M"); code != 0 {
		t.Fatalf("rollback s1 --rate 1M: exit %d: %s", code, errs)
	}
	rbRunning(t, d, "s1", "just after the rollback answered")
	refused := func(what, want string, args ...string) {
		t.Helper()
		_, errs, code := cli(t, append(args, "--control", d.ctl)...)
		if code != 1 || !strings.Contains(errs, want) {
			t.Fatalf("%s during the rollback: exit %d, stderr %q; want exit 1 saying %q", what, code, errs, want)
		}
	}
	refused("create", `a rollback to "s1" is under way: snapshots can be created once it is complete`,
		"create", "s9", "--backing", rbStore(d, "s9"))
	rbGone(t, d, "s9")
	refused("clear of the source", `rolled back to "s1": it cannot be cleared before the rollback is complete`, "clear", "s1", "--force")
	refused("clear --bookmark of the source", `it cannot be turned into a bookmark before the rollback is complete`, "clear", "s1", "--bookmark")
	refused("a second rollback", `a rollback to "s1" is under way`, "rollback", "s1", "--force")
	st := rbRunning(t, d, "s1", "after the refusals")
	if s, ok := rbSnap(t, d, "s1"); !ok || s.State != control.StateValid || s.Bookmark || !s.Served {
		t.Fatalf("s1 after the refused clears: %+v", s)
	}
	t.Logf("refusals done with %d of %d bytes still to copy back", st.RemainingBytes, st.TotalBytes)

	rbWaitDone(t, d, 30*time.Second)
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), s1)
	rbCreate(t, d, "s9")
	if out := mustCLI(t, "clear", "s1", "--control", d.ctl); out != "s1: cleared\n" {
		t.Fatalf("clear s1 after the rollback: %q", out)
	}
	rbGone(t, d, "s1")
	rbSame(t, "s9's export", readExport(t, d.uri("s9")), s1)
}

// TestRollbackConsume: rollback --consume --wait --json prints one JSON
// status per update, remaining_bytes never increasing, the last done with
// consume; the snapshot is then gone (list, record, store) and the origin
// reads its image, also from the file after a stop.
func TestRollbackConsume(t *testing.T) {
	rbRequire(t)
	const size, k = 8 << 20, 64
	r := rbRand(t, 6)
	d, s1, _, _ := rbScatterSetup(t, r, size, k)

	out, errs, code := rbRollback(t, d, "s1", "--consume", "--wait", "--json", "--rate", "16M")
	if code != 0 {
		t.Fatalf("rollback s1 --consume --wait --json: exit %d: %s", code, errs)
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	var st control.RollbackStatus
	n, last := 0, int64(1<<62)
	for sc.Scan() {
		st = control.RollbackStatus{}
		if err := json.Unmarshal(sc.Bytes(), &st); err != nil {
			t.Fatalf("--json line %q: %v", sc.Text(), err)
		}
		if st.RemainingBytes > last || st.Snapshot != "s1" || !st.Consume || st.TotalBytes != k*rbCluster {
			t.Fatalf("--json line %d: %+v (remaining before %d)", n, st, last)
		}
		last = st.RemainingBytes
		n++
	}
	if n < 2 || st.State != control.RollbackDone || st.RemainingBytes != 0 {
		t.Fatalf("%d --json lines, the last %+v; want several, the last done", n, st)
	}
	if l := mustCLI(t, "list", "--control", d.ctl); strings.Contains(l, "s1") {
		t.Fatalf("list after rollback --consume: %q", l)
	}
	rbGone(t, d, "s1")
	rbNoProgress(t, d, "after the rollback")
	rbSame(t, "origin export after rollback --consume", readExport(t, d.uri("data")), s1)
	rbStop(t, d)
	rbSame(t, "origin file after rollback --consume", rbFile(t, d.origin), s1)
}

// TestRollbackCrashPoints: the daemon killed (SIGKILL) at each step of a
// rollback, with and without --consume, and restarted.
//
//   - rollback:file, the progress file created, nothing recorded in it:
//     the command never answered, so after the restart there is no
//     rollback, the origin is unchanged and the progress file is gone;
//     a rollback then works.
//   - rollback:started, the rollback instant passed (the command did not
//     answer), and rollback:ended and rollback:consumed, the copy complete
//     (the command had answered): after the restart the rollback is
//     complete, the origin reads s1's image, the progress file is gone,
//     and s1 is gone with --consume, listed valid with its image without.
func TestRollbackCrashPoints(t *testing.T) {
	rbRequire(t)
	const size, k = 8 << 20, 32
	for i, point := range []string{"rollback:file", "rollback:started", "rollback:ended", "rollback:consumed"} {
		for _, consume := range []bool{false, true} {
			name := point
			if consume {
				name += "/consume"
			}
			t.Run(name, func(t *testing.T) {
				seed := uint64(10 + 2*i)
				if consume {
					seed++
				}
				r := rbRand(t, seed)
				d, s1 := rbStart(t, r, size, point)
				rbCreate(t, d, "s1")
				cur := bytes.Clone(s1)
				ws, _ := rbScatter(r, size, k)
				rbApply(t, d, "data", cur, ws)
				args := []string{"s1"}
				if consume {
					args = append(args, "--consume")
				}
				_, errs, code := rbRollback(t, d, args...)
				crashDied(t, d, point)
				answered := point == "rollback:ended" || point == "rollback:consumed"
				if want := map[bool]int{false: 1, true: 0}[answered]; code != want {
					t.Fatalf("rollback with the daemon dying at %s: exit %d (%s); want %d", point, code, errs, want)
				}
				fi, err := os.Stat(rbProgressFile(d))
				if err != nil {
					t.Fatalf("no progress file after a crash at %s: %v", point, err)
				}
				if (fi.Size() == 0) != (point == "rollback:file") {
					t.Fatalf("progress file of %d bytes after a crash at %s", fi.Size(), point)
				}
				// s1 is cleared between rollback:ended and rollback:consumed.
				if phase := crashPhase(t, d.state, "s1"); (phase == "") != (consume && point == "rollback:consumed") {
					t.Fatalf("s1's record after a crash at %s: phase %q", point, phase)
				}

				d = rbRestart(t, d)
				if point == "rollback:file" {
					if st := rbStatus(t, d); st != nil {
						t.Fatalf("a rollback that never answered shows after the restart: %+v", st)
					}
					rbNoProgress(t, d, "after the restart")
					rbSame(t, "origin export after the restart", readExport(t, d.uri("data")), cur)
					crashSnapValid(t, d, "s1", s1)
					// It can be done again.
					if _, errs, code := rbRollback(t, d, append(args, "--wait")...); code != 0 {
						t.Fatalf("rollback after the restart: exit %d: %s", code, errs)
					}
					if consume {
						rbGone(t, d, "s1")
					}
					rbSame(t, "origin export after a second rollback", readExport(t, d.uri("data")), s1)
					return
				}
				switch st := rbStatus(t, d); {
				case point == "rollback:started" && st == nil:
					t.Fatal("status shows no rollback after a crash at rollback:started: it should have resumed")
				case point == "rollback:started":
					if st.Snapshot != "s1" || st.Consume != consume || st.TotalBytes != k*rbCluster {
						t.Fatalf("resumed rollback: %+v", st)
					}
					rbWaitDone(t, d, 30*time.Second)
				case st != nil:
					t.Fatalf("status shows a rollback after a crash at %s, which the restart found complete: %+v", point, st)
				}
				rbNoProgress(t, d, "after the restart")
				rbSame(t, "origin export after the restart", readExport(t, d.uri("data")), s1)
				if consume {
					rbGone(t, d, "s1")
				} else {
					crashSnapValid(t, d, "s1", s1)
				}
				rbStop(t, d)
				rbSame(t, "origin file", rbFile(t, d.origin), s1)
			})
		}
	}
}

// rbMidway starts a throttled rollback (4 MiB/s) of the scatter setup,
// waits until part of it is copied back, then writes patterns through the
// origin (flushed: qemu-io's flush) into a cluster copied back, one not
// yet, and one never copied, and returns the remaining bytes sampled
// before those writes.
func rbMidway(t *testing.T, d *daemon, cur []byte, clusters []int) int64 {
	t.Helper()
	if _, errs, code := rbRollback(t, d, "s1", "--rate", "4M"); code != 0 {
		t.Fatalf("rollback s1 --rate 4M: exit %d: %s", code, errs)
	}
	var st control.RollbackStatus
	waitFor(t, func() bool {
		st = rbRunning(t, d, "s1", "waiting for part of the copy")
		return st.RemainingBytes <= st.TotalBytes-st.TotalBytes/8
	})
	k := len(clusters)
	uncopied := 0
	for slices.Contains(clusters, uncopied) {
		uncopied++
	}
	rbQemu(t, d, cur,
		rbOp{off: clusters[0]*rbCluster + 100, n: 5000, pattern: 0xc1},
		rbOp{off: clusters[k-1]*rbCluster + 70, n: 9000, pattern: 0xc2},
		rbOp{off: clusters[k-2] * rbCluster, n: 2 * rbCluster, pattern: 0xc3},
		rbOp{off: uncopied*rbCluster + 3, n: 1000, pattern: 0xc4},
	)
	rbRunning(t, d, "s1", "after the writes")
	rbSame(t, "origin export during the rollback", readExport(t, d.uri("data")), cur)
	return st.RemainingBytes
}

// TestRollbackKilledMidCopy: kill -9 of the daemon in the middle of a
// throttled rollback, after flushed writes through the origin. After the
// restart status shows the rollback running again, with no more to copy
// back than before the flush, and it completes: the origin is s1's image
// plus the writes, s1's export its image.
func TestRollbackKilledMidCopy(t *testing.T) {
	rbRequire(t)
	const size, k = 32 << 20, 256
	r := rbRand(t, 30)
	d, s1, _, clusters := rbScatterSetup(t, r, size, k)
	cur := bytes.Clone(s1)
	remaining := rbMidway(t, d, cur, clusters)
	d.kill9()

	d = rbRestart(t, d)
	st := rbRunning(t, d, "s1", "after the restart")
	t.Logf("%d bytes to copy back before the writes and the kill, %d after the restart", remaining, st.RemainingBytes)
	if st.RemainingBytes > remaining || st.TotalBytes != k*rbCluster || st.Rate != 4<<20 {
		t.Fatalf("resumed rollback: %+v; want %d bytes total, at most %d left (progress made durable by the flush), rate 4M", st, k*rbCluster, remaining)
	}
	rbSame(t, "origin export after the restart", readExport(t, d.uri("data")), cur)
	rbWaitDone(t, d, 30*time.Second)
	rbNoProgress(t, d, "after the rollback")
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), cur)
	crashSnapValid(t, d, "s1", s1)
	rbStop(t, d)
	rbSame(t, "origin file after the rollback", rbFile(t, d.origin), cur)
}

// TestRollbackStoreMissingAtRestart: the daemon stopped in the middle of a
// throttled rollback, and the source's store moved away: the daemon
// refuses to start, saying a rollback to s1 is under way and naming its
// store. The store put back, it starts, resumes and completes the
// rollback: the origin is s1's image plus the writes made before the
// stop, and s1 is valid, also after one more restart (nothing was served
// without it).
func TestRollbackStoreMissingAtRestart(t *testing.T) {
	rbRequire(t)
	const size, k = 16 << 20, 128
	r := rbRand(t, 31)
	d, s1, _, clusters := rbScatterSetup(t, r, size, k)
	uuid := mustSnapUUID(t, d, "s1")
	cur := bytes.Clone(s1)
	rbMidway(t, d, cur, clusters)
	rbStop(t, d)
	if _, err := os.Stat(rbProgressFile(d)); err != nil {
		t.Fatalf("no progress file after a stop in the middle of the rollback (did it finish first?): %v", err)
	}
	origin := rbFile(t, d.origin)

	store, aside := rbStore(d, "s1"), filepath.Join(d.dir, "aside.cow")
	if err := os.Rename(store, aside); err != nil {
		t.Fatal(err)
	}
	msg := rbExitError(t, rbRefusedStart(t, d))
	for _, want := range []string{"rollback to snapshot s1", uuid, store, "not served"} {
		if !strings.Contains(msg, want) {
			t.Fatalf("daemon refusing to start without the rollback's store says %q; want it to say %q", msg, want)
		}
	}
	rbSame(t, "origin file after the refused start", rbFile(t, d.origin), origin)
	// Nothing was served without s1: its record must not say invalid.
	if rec := rbFile(t, filepath.Join(d.state, "snap-s1.json")); bytes.Contains(rec, []byte(`"invalid": true`)) {
		t.Fatalf("the refused start recorded s1 invalid, though the origin was not served:\n%s", rec)
	}

	if err := os.Rename(aside, store); err != nil {
		t.Fatal(err)
	}
	d = rbRestart(t, d)
	rbRunning(t, d, "s1", "after the restart with the store back")
	rbSame(t, "origin export after the restart", readExport(t, d.uri("data")), cur)
	rbWaitDone(t, d, 30*time.Second)
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), cur)
	crashSnapValid(t, d, "s1", s1)
	rbStop(t, d)
	rbSame(t, "origin file after the rollback", rbFile(t, d.origin), cur)

	// The origin was never served without s1: it stays valid.
	d = rbRestart(t, d)
	crashSnapValid(t, d, "s1", s1)
	rbSame(t, "origin export after one more restart", readExport(t, d.uri("data")), cur)
}

// mustSnapUUID returns snapshot name's store UUID.
func mustSnapUUID(t *testing.T, d *daemon, name string) string {
	t.Helper()
	s, ok := rbSnap(t, d, name)
	if !ok || s.UUID == "" {
		t.Fatalf("snapshot %q: %+v", name, s)
	}
	return s.UUID
}

// TestRollbackDamagedProgress: the daemon stopped in the middle of a
// throttled rollback, and garbage written over the head of the progress
// file: the daemon refuses to start, naming the file and saying the
// origin is not served, and writes nothing to the origin. The file
// repaired, it starts and the rollback completes.
func TestRollbackDamagedProgress(t *testing.T) {
	rbRequire(t)
	const size, k = 16 << 20, 128
	r := rbRand(t, 32)
	d, s1, _, clusters := rbScatterSetup(t, r, size, k)
	cur := bytes.Clone(s1)
	rbMidway(t, d, cur, clusters)
	rbStop(t, d)
	prog := rbFile(t, rbProgressFile(d))
	origin := rbFile(t, d.origin)

	damaged := bytes.Clone(prog)
	copy(damaged[0:], "garbage, not a progress header")
	if err := os.WriteFile(rbProgressFile(d), damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	msg := rbExitError(t, rbRefusedStart(t, d))
	for _, want := range []string{rbProgressFile(d), "rollback progress", "not served"} {
		if !strings.Contains(msg, want) {
			t.Fatalf("daemon refusing to start with a damaged progress file says %q; want it to say %q", msg, want)
		}
	}
	rbSame(t, "origin file after the refused start", rbFile(t, d.origin), origin)
	if !bytes.Equal(rbFile(t, rbProgressFile(d)), damaged) {
		t.Fatal("the refused start changed the damaged progress file")
	}

	if err := os.WriteFile(rbProgressFile(d), prog, 0o600); err != nil {
		t.Fatal(err)
	}
	d = rbRestart(t, d)
	rbRunning(t, d, "s1", "after the restart with the progress file repaired")
	rbWaitDone(t, d, 30*time.Second)
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), cur)
	crashSnapValid(t, d, "s1", s1)
}

// TestRollbackStatusToTheEnd: from the moment a rollback answers until it
// is done, status always shows it, remaining_bytes never increasing, also
// while the daemon finishes it (the progress file removed, the snapshot
// cleared with --consume); `rollback --wait` run meanwhile exits 0. Status
// is asked in a tight loop on the control socket, so that it falls in
// every step of the finish.
func TestRollbackStatusToTheEnd(t *testing.T) {
	rbRequire(t)
	const size, k = 8 << 20, 64
	r := rbRand(t, 7)
	d, s1, _, _ := rbScatterSetup(t, r, size, k)
	c := control.NewClient(d.ctl)
	ctx := t.Context()
	var prev time.Time
	for _, consume := range []bool{false, true} {
		args := []string{"s1", "--wait", "--rate", "8M"}
		if consume {
			args = append(args, "--consume")
		}
		type result struct {
			out, errs string
			code      int
		}
		done := make(chan result, 1)
		go func() {
			var out, errb bytes.Buffer
			cmd := exec.Command(nbdsnapBin, append([]string{"rollback", "--control", d.ctl}, args...)...)
			cmd.Stdout, cmd.Stderr = &out, &errb
			cmd.Run()
			done <- result{out.String(), errb.String(), cmd.ProcessState.ExitCode()}
		}()
		seen, polls, last := false, 0, int64(-1)
		for deadline := time.Now().Add(20 * time.Second); ; {
			st, err := c.Status(ctx)
			if err != nil {
				t.Fatalf("status: %v", err)
			}
			polls++
			rb := st.Rollback
			if rb != nil && !rb.Started.Equal(prev) {
				seen = true
				if last >= 0 && rb.RemainingBytes > last {
					t.Fatalf("remaining_bytes went up from %d to %d", last, rb.RemainingBytes)
				}
				last = rb.RemainingBytes
				if rb.State == control.RollbackDone {
					prev = rb.Started
					break
				}
				if rb.State != control.RollbackRunning {
					t.Fatalf("rollback status %+v", rb)
				}
			} else if seen {
				t.Fatalf("consume %v: status shows %+v after it showed the rollback running (poll %d, %d bytes left at the last): a rollback --wait polling then fails", consume, rb, polls, last)
			}
			if time.Now().After(deadline) {
				t.Fatalf("rollback not done after 20s: %+v", rb)
			}
		}
		res := <-done
		if res.code != 0 || !strings.HasSuffix(res.out, "s1: rollback complete"+map[bool]string{false: "", true: ", s1 cleared"}[consume]+"\n") {
			t.Fatalf("rollback %v: exit %d, stdout %q, stderr %q", args, res.code, res.out, res.errs)
		}
		t.Logf("consume %v: %d status polls", consume, polls)
		rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), s1)
	}
	rbGone(t, d, "s1")
}

// TestRollbackWaitWhileConsuming: the daemon's state directory sits on a
// file system whose writes can be held (stallfs). A rollback --consume
// --wait to s1, every cluster restored by writes over it and recorded by
// a flush, so that the copy completes without writing its progress again;
// then writes are held, and clearing s1 (its record marked "clearing")
// waits for the disk. Meanwhile status must show the rollback to s1 (not
// done: s1 is not cleared yet), and `rollback --wait`, polling all along,
// must not give up. Once the disk answers, it exits 0 saying s1 was
// cleared, status says done, s1 is gone, and the origin holds the writes.
func TestRollbackWaitWhileConsuming(t *testing.T) {
	rbRequire(t)
	const size, k = 8 << 20, 16
	r := rbRand(t, 8)
	stall := stallfs.Mount(t, t.TempDir())
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	b := make([]byte, size)
	incRandomBytes(r, b)
	if err := os.WriteFile(origin, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "stores"), 0o700); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, dir, origin, filepath.Join(dir, "data.sock"), filepath.Join(dir, "data.ctl"), filepath.Join(stall.Dir(), "state"))
	d.spawn("data", "--state-dir", d.state)
	d.waitReady(10 * time.Second)
	rbCreate(t, d, "s1")
	ws, clusters := rbScatter(r, size, k)
	rbApply(t, d, "data", nil, ws)

	var out, errb bytes.Buffer
	cmd := exec.Command(nbdsnapBin, "rollback", "--control", d.ctl, "s1", "--consume", "--wait", "--rate", "32K")
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	waitFor(t, func() bool { st := rbStatus(t, d); return st != nil })
	// Every cluster to copy back written over whole (restored first, by
	// the write), and flushed: the progress is recorded, and the copier,
	// which sleeps two seconds after its first cluster at 32 KiB/s, finds
	// nothing left to do.
	cur := bytes.Clone(b)
	var ops []rbOp
	for i, c := range clusters {
		ops = append(ops, rbOp{off: c * rbCluster, n: rbCluster, pattern: byte(0xd0 + i)})
	}
	rbQemu(t, d, cur, ops...)
	if st := rbStatus(t, d); st == nil || st.State != control.RollbackRunning || st.RemainingBytes != 0 {
		t.Fatalf("status after every cluster was written over: %+v; want the rollback running (the copier asleep), nothing left to copy", st)
	}
	stall.Hold()
	held := true
	defer func() {
		if held {
			stall.Resume()
		}
	}()
	waitFor(t, func() bool { return stall.Blocked() > 0 })
	time.Sleep(500 * time.Millisecond) // rollback --wait polls meanwhile
	if st := rbStatus(t, d); st == nil || st.Snapshot != "s1" || st.State != control.RollbackRunning || st.RemainingBytes != 0 {
		t.Errorf("status while s1 is being cleared, the copy complete: %+v; want the rollback to s1, still running, nothing left to copy", st)
	}
	select {
	case err := <-waited:
		t.Fatalf("rollback --wait returned while s1 was being cleared: %v, stdout %q, stderr %q", err, out.String(), errb.String())
	default:
	}
	stall.Resume()
	held = false
	select {
	case err := <-waited:
		if err != nil || !strings.HasSuffix(out.String(), "s1: rollback complete, s1 cleared\n") {
			t.Fatalf("rollback --consume --wait: %v, stdout %q, stderr %q", err, out.String(), errb.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("rollback --wait still running 20s after the disk answered")
	}
	if st := rbStatus(t, d); st == nil || st.State != control.RollbackDone || !st.Consume {
		t.Fatalf("status after the rollback: %+v", st)
	}
	rbGone(t, d, "s1")
	rbSame(t, "origin export after the rollback", readExport(t, d.uri("data")), cur)
}
