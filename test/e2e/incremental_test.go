package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// Incremental backups with changed-block tracking, judged with the tools a
// backup would use: nbdcopy for the full copy, nbdinfo --map for the
// qemu:dirty-bitmap:BASE context of the later snapshot's export, dd through
// an nbdfuse mount for the changed ranges, cmp for the result; qemu-img
// map (x-dirty-bitmap) and libnbd from Python (both contexts on one
// connection) read the same context, `nbdsnap diff` must agree with all.
//
// Every changed block is judged against two bounds: the blocks the test
// wrote (a block nobody wrote must not be reported) and the bytes that
// really differ between the two images (each must lie in a reported
// block). Random offsets, lengths and data come from one seed, printed;
// NBDSNAP_E2E_SEED=N replays a run.

// incGranularity is the cluster size the tests' snapshots use (the
// default), which is the granularity of their dirty bitmaps.
const incGranularity = 64 << 10

// incExtent is a byte range of an export.
type incExtent struct{ Offset, Length int64 }

func (e incExtent) String() string { return fmt.Sprintf("[%d,+%d)", e.Offset, e.Length) }

// incRand returns the test's random source and logs its seed.
func incRand(t *testing.T) *rand.Rand {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("NBDSNAP_E2E_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("NBDSNAP_E2E_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (NBDSNAP_E2E_SEED=%d replays it)", seed, seed)
	return rand.New(rand.NewPCG(seed, 0x1bc))
}

// incRandomBytes fills b from r.
func incRandomBytes(r *rand.Rand, b []byte) {
	var w [8]byte
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(b[i:], w[:])
	}
}

// incOrigin makes a sparse origin file of size bytes with random data in
// parts: each MiB is random with probability 1/3, else a hole.
func incOrigin(t *testing.T, r *rand.Rand, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if r.IntN(3) != 0 {
			continue
		}
		incRandomBytes(r, buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// incOp is one request the test makes on the origin export.
type incOp struct {
	kind    string // "write" (a pattern), "zero" (write zeroes) or "discard"
	off, n  int64
	pattern byte
}

// qemuIO is the op as a qemu-io command.
func (o incOp) qemuIO() string {
	switch o.kind {
	case "zero":
		return fmt.Sprintf("write -q -z %d %d", o.off, o.n)
	case "discard":
		return fmt.Sprintf("discard -q %d %d", o.off, o.n)
	}
	return fmt.Sprintf("write -q -P %d %d %d", o.pattern, o.off, o.n)
}

// incRandomOps makes n requests at random offsets of an export of size
// bytes, 1 byte to 256 KiB long (so some cross a cluster boundary), with
// nonzero patterns; with mixed, a fifth are write-zeroes and a fifth
// discards. The first touches byte 0 and the second the last byte.
func incRandomOps(r *rand.Rand, size int64, n int, mixed bool) []incOp {
	ops := make([]incOp, n)
	for i := range ops {
		o := incOp{kind: "write", pattern: byte(1 + r.IntN(255)), n: 1 + r.Int64N(256<<10)}
		o.off = r.Int64N(size)
		switch i {
		case 0:
			o.off = 0
		case 1:
			o.off = size - o.n
		}
		o.n = min(o.n, size-o.off)
		if mixed && i >= 2 {
			switch r.IntN(5) {
			case 0:
				o.kind = "zero"
			case 1:
				o.kind = "discard"
			}
		}
		ops[i] = o
	}
	return ops
}

// incApply sends ops to the origin export with one qemu-io.
func incApply(t *testing.T, d *daemon, ops []incOp) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, o := range ops {
		args = append(args, "-c", o.qemuIO())
	}
	run(t, "qemu-io", append(args, d.uri("data"))...)
}

// incClusters is a set of clusters of an export, one flag per cluster.
type incClusters []bool

func newIncClusters(size int64) incClusters {
	return make(incClusters, (size+incGranularity-1)/incGranularity)
}

// touch adds the clusters [off, off+n) touches.
func (c incClusters) touch(off, n int64) {
	for k := off / incGranularity; k <= (off+n-1)/incGranularity; k++ {
		c[k] = true
	}
}

// add adds the clusters ops touch; with writesOnly, only those of writes
// and write-zeroes (a discard need not change a byte).
func (c incClusters) add(ops []incOp, writesOnly bool) incClusters {
	for _, o := range ops {
		if !writesOnly || o.kind != "discard" {
			c.touch(o.off, o.n)
		}
	}
	return c
}

func (c incClusters) count() int {
	n := 0
	for _, v := range c {
		if v {
			n++
		}
	}
	return n
}

// incClustersOf turns extents into the set of clusters they cover; an
// extent not aligned to the granularity (but for the export's end) fails
// the test.
func incClustersOf(t *testing.T, size int64, ext []incExtent, what string) incClusters {
	t.Helper()
	c := newIncClusters(size)
	for _, e := range ext {
		end := e.Offset + e.Length
		if e.Offset%incGranularity != 0 || (end%incGranularity != 0 && end != size) || e.Length <= 0 || end > size {
			t.Fatalf("%s: extent %v is not whole clusters of %d bytes within the export of %d bytes", what, e, incGranularity, size)
		}
		c.touch(e.Offset, e.Length)
	}
	return c
}

// incBytes is the number of bytes ext covers.
func incBytes(ext []incExtent) int64 {
	var n int64
	for _, e := range ext {
		n += e.Length
	}
	return n
}

// incMerge sorts extents and merges those that touch.
func incMerge(ext []incExtent) []incExtent {
	ext = slices.Clone(ext)
	slices.SortFunc(ext, func(a, b incExtent) int { return int(a.Offset - b.Offset) })
	var out []incExtent
	for _, e := range ext {
		if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length >= e.Offset {
			out[k].Length = max(out[k].Offset+out[k].Length, e.Offset+e.Length) - out[k].Offset
			continue
		}
		out = append(out, e)
	}
	return out
}

// incCovered fails the test unless the extents, in order, cover [0, size)
// exactly once, as a block status map of a whole export must.
func incCovered(t *testing.T, what string, size int64, offs, lens []int64) {
	t.Helper()
	var at int64
	for i := range offs {
		if offs[i] != at || lens[i] <= 0 {
			t.Fatalf("%s: extent %d is [%d,+%d), expected one starting at %d", what, i, offs[i], lens[i], at)
		}
		at += lens[i]
	}
	if at != size {
		t.Fatalf("%s: the extents end at %d; the export has %d bytes", what, at, size)
	}
}

// incNbdinfoDirty reads qemu:dirty-bitmap:BASE of export with nbdinfo
// --map --json and returns the dirty extents, merged.
func incNbdinfoDirty(t *testing.T, d *daemon, export, base string, size int64) []incExtent {
	t.Helper()
	testenv.RequireTool(t, "nbdinfo")
	out := run(t, "nbdinfo", "--map=qemu:dirty-bitmap:"+base, "--json", d.uri(export))
	var m []struct {
		Offset, Length int64
		Type           int
		Description    string
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var offs, lens []int64
	var dirty []incExtent
	for _, e := range m {
		offs, lens = append(offs, e.Offset), append(lens, e.Length)
		if e.Type&1 != 0 {
			dirty = append(dirty, incExtent{e.Offset, e.Length})
		}
	}
	incCovered(t, "nbdinfo --map=qemu:dirty-bitmap:"+base+" of "+export, size, offs, lens)
	return incMerge(dirty)
}

// incQemuImgDirty reads the same context with qemu-img map and QEMU's
// x-dirty-bitmap option, under which a dirty block is reported as
// "data": false, and returns those extents, merged.
func incQemuImgDirty(t *testing.T, d *daemon, export, base string, size int64) []incExtent {
	t.Helper()
	testenv.RequireTool(t, "qemu-img")
	out := run(t, "qemu-img", "map", "--output=json", "--image-opts",
		"driver=nbd,server.type=unix,server.path="+d.sock+",export="+export+",x-dirty-bitmap=qemu:dirty-bitmap:"+base)
	var m []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map --output=json: %v\n%s", err, out)
	}
	var offs, lens []int64
	var dirty []incExtent
	for _, e := range m {
		offs, lens = append(offs, e.Start), append(lens, e.Length)
		if !e.Data {
			dirty = append(dirty, incExtent{e.Start, e.Length})
		}
	}
	incCovered(t, "qemu-img map x-dirty-bitmap=qemu:dirty-bitmap:"+base+" of "+export, size, offs, lens)
	return incMerge(dirty)
}

// incDiff runs `nbdsnap diff BASE [TARGET] --json` and returns its answer.
func incDiff(t *testing.T, d *daemon, base, target string) control.Diff {
	t.Helper()
	args := []string{"diff", base}
	if target != "" {
		args = append(args, target)
	}
	out := mustCLI(t, append(args, "--json", "--control", d.ctl)...)
	var diff control.Diff
	if err := json.Unmarshal([]byte(out), &diff); err != nil {
		t.Fatalf("nbdsnap diff --json: %v\n%s", err, out)
	}
	if diff.Granularity != incGranularity {
		t.Fatalf("nbdsnap diff %s %s: granularity %d; the snapshots have %d-byte clusters", base, target, diff.Granularity, incGranularity)
	}
	return diff
}

// incDiffRanges is the ranges of a diff, merged, after checking that its
// changed_bytes is their sum.
func incDiffRanges(t *testing.T, diff control.Diff) []incExtent {
	t.Helper()
	var ext []incExtent
	for _, r := range diff.Ranges {
		ext = append(ext, incExtent{r.Offset, r.Length})
	}
	if incBytes(ext) != diff.ChangedBytes {
		t.Fatalf("nbdsnap diff %s %s: changed_bytes %d, but its ranges add up to %d", diff.Base, diff.Target, diff.ChangedBytes, incBytes(ext))
	}
	return incMerge(ext)
}

// bothContextsPy negotiates base:allocation and qemu:dirty-bitmap:BASE on
// one connection, as backup tools do, walks the export with block status
// and prints each context's extents as JSON: {context: [[offset, length,
// flags], ...]}.
const bothContextsPy = `
import json, nbd, sys
uri, base = sys.argv[1], sys.argv[2]
alloc, dirty = "base:allocation", "qemu:dirty-bitmap:" + base
h = nbd.NBD()
h.add_meta_context(alloc)
h.add_meta_context(dirty)
h.connect_uri(uri)
for c in (alloc, dirty):
    if not h.can_meta_context(c):
        sys.exit("the server did not agree to " + c)
size = h.get_size()
out = {alloc: [], dirty: []}
off = 0
while off < size:
    got = {}
    def cb(ctx, o, entries, err):
        if ctx in got or o != off:
            raise Exception("unexpected extents for %s at %d" % (ctx, o))
        got[ctx] = entries
        return 0
    h.block_status(min(size - off, 1 << 30), off, cb)
    if set(got) != {alloc, dirty}:
        sys.exit("block status at %d answered for %s only" % (off, sorted(got)))
    # Each context may cover a different length: keep what both covered.
    ends = {}
    for c, e in got.items():
        at = off
        for i in range(0, len(e), 2):
            n = min(e[i], size - at)
            if n > 0:
                out[c].append([at, n, e[i + 1]])
            at += e[i]
        ends[c] = at
    end = min(ends.values())
    if end <= off:
        sys.exit("block status at %d made no progress" % off)
    for c in out:
        while out[c] and out[c][-1][0] >= end:
            out[c].pop()
        if out[c] and out[c][-1][0] + out[c][-1][1] > end:
            out[c][-1][1] = end - out[c][-1][0]
    off = end
print(json.dumps(out))
`

// incRequireLibnbd returns the python3 that has python3-libnbd, or skips
// (fails when strict).
func incRequireLibnbd(t *testing.T) string {
	t.Helper()
	py := testenv.RequireTool(t, "/usr/bin/python3")
	if err := exec.Command(py, "-c", "import nbd").Run(); err != nil {
		if testenv.Strict() {
			t.Fatalf("%s cannot import nbd: python3-libnbd is not installed (make deps installs it)", py)
		}
		t.Skipf("SKIP: python3-libnbd is not installed (make deps installs it)")
	}
	return py
}

// incBothContexts runs bothContextsPy on export and returns the dirty
// extents, merged; base:allocation must cover the export too.
func incBothContexts(t *testing.T, d *daemon, dir, export, base string, size int64) []incExtent {
	t.Helper()
	py := incRequireLibnbd(t)
	script := filepath.Join(dir, "both-contexts.py")
	if err := os.WriteFile(script, []byte(bothContextsPy), 0o600); err != nil {
		t.Fatal(err)
	}
	out := run(t, py, script, d.uri(export), base)
	var m map[string][][3]int64
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("both contexts: %v\n%s", err, out)
	}
	var dirty []incExtent
	for ctx, ext := range m {
		var offs, lens []int64
		for _, e := range ext {
			offs, lens = append(offs, e[0]), append(lens, e[1])
			if ctx != "base:allocation" && e[2]&1 != 0 {
				dirty = append(dirty, incExtent{e[0], e[1]})
			}
		}
		incCovered(t, "libnbd block status, "+ctx+" of "+export+" (both contexts negotiated)", size, offs, lens)
	}
	return incMerge(dirty)
}

// listPrefixPy asks the server, during option haggling, for the contexts
// matching the query "qemu:dirty-bitmap:" (NBD_OPT_LIST_META_CONTEXT with
// a namespace prefix, as oVirt imageio asks before it picks "the" bitmap)
// and prints them, one a line.
const listPrefixPy = `
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.add_meta_context("qemu:dirty-bitmap:")
got = []
h.opt_list_meta_context(lambda name: got.append(name) or 0)
h.opt_abort()
print("\n".join(sorted(got)))
`

// incPrefixList runs listPrefixPy on export and returns the base names.
func incPrefixList(t *testing.T, d *daemon, dir, export string) []string {
	t.Helper()
	py := incRequireLibnbd(t)
	script := filepath.Join(dir, "list-prefix.py")
	if err := os.WriteFile(script, []byte(listPrefixPy), 0o600); err != nil {
		t.Fatal(err)
	}
	bases := []string{}
	for _, l := range strings.Fields(run(t, py, script, d.uri(export))) {
		b, ok := strings.CutPrefix(l, "qemu:dirty-bitmap:")
		if !ok {
			t.Fatalf("the query qemu:dirty-bitmap: on %s listed %q", export, l)
		}
		bases = append(bases, b)
	}
	return bases
}

// incSame fails the test unless two readings of the changed blocks agree.
func incSame(t *testing.T, what string, got, want []incExtent) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s disagrees with nbdinfo --map:\n got  %v\n want %v", what, got, want)
	}
}

// incContexts lists every export's qemu:dirty-bitmap contexts with
// nbdinfo --list --json (the base names, sorted), and checks that each
// export offers base:allocation as well.
func incContexts(t *testing.T, d *daemon) map[string][]string {
	t.Helper()
	out := run(t, "nbdinfo", "--list", "--json", d.uri(""))
	var l struct {
		Exports []struct {
			Name     string   `json:"export-name"`
			Contexts []string `json:"contexts"`
		}
	}
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	m := map[string][]string{}
	for _, e := range l.Exports {
		if !slices.Contains(e.Contexts, "base:allocation") {
			t.Fatalf("nbdinfo --list: export %q does not offer base:allocation: %v", e.Name, e.Contexts)
		}
		bases := []string{}
		for _, c := range e.Contexts {
			if b, ok := strings.CutPrefix(c, "qemu:dirty-bitmap:"); ok {
				bases = append(bases, b)
			}
		}
		slices.Sort(bases)
		m[e.Name] = bases
	}
	return m
}

// incWantContexts fails the test unless nbdinfo --list shows exactly the
// exports of want, each with exactly the dirty-bitmap bases given.
func incWantContexts(t *testing.T, d *daemon, want map[string][]string, when string) {
	t.Helper()
	got := incContexts(t, d)
	for _, bases := range want {
		slices.Sort(bases)
	}
	if len(got) != len(want) {
		t.Fatalf("%s: nbdinfo --list shows exports %v; want %v", when, got, want)
	}
	for name, bases := range want {
		if g, ok := got[name]; !ok || !slices.Equal(g, bases) {
			t.Fatalf("%s: nbdinfo --list shows export %q with qemu:dirty-bitmap contexts for %v (listed: %v); want %v",
				when, name, g, ok, bases)
		}
	}
}

// incDD copies each extent of src into dst at the same offset with dd,
// the way the README shows it, and returns the bytes dd says it copied.
func incDD(t *testing.T, src, dst string, ext []incExtent) int64 {
	t.Helper()
	copied := regexp.MustCompile(`(?m)^(\d+) bytes .* copied`)
	var total int64
	for _, e := range ext {
		out := run(t, "dd", "if="+src, "of="+dst, "bs=1M", "iflag=skip_bytes,count_bytes", "oflag=seek_bytes",
			"conv=notrunc", fmt.Sprintf("skip=%d", e.Offset), fmt.Sprintf("seek=%d", e.Offset), fmt.Sprintf("count=%d", e.Length))
		m := copied.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("dd printed no byte count:\n%s", out)
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		if n != e.Length {
			t.Fatalf("dd copied %d bytes of extent %v", n, e)
		}
		total += n
	}
	return total
}

// incCopy copies the extents of export into dst through a read-only
// nbdfuse mount and dd, and detaches.
func incCopy(t *testing.T, d *daemon, export, dst string, ext []incExtent) int64 {
	t.Helper()
	file, detach := fuseAttach(t, d.uri(export), true)
	n := incDD(t, file, dst, ext)
	detach()
	// nbdfuse has gone; wait until the daemon has seen its connections
	// close, so that a clear or a stop that follows finds none.
	waitFor(t, func() bool {
		for _, s := range d.status(t).Snapshots {
			if s.Name == export && s.Conns != 0 {
				return false
			}
		}
		return true
	})
	return n
}

// incSave copies a whole export into a file with nbdcopy.
func incSave(t *testing.T, d *daemon, export, path string) {
	t.Helper()
	testenv.RequireTool(t, "nbdcopy")
	run(t, "nbdcopy", d.uri(export), path)
}

// incChanged compares two images of size bytes and returns how many bytes
// differ, failing the test at the first differing byte outside dirty.
func incChanged(t *testing.T, a, b string, size int64, dirty incClusters, what string) int64 {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	var changed int64
	for off := int64(0); off < size; off += int64(len(ba)) {
		n := int(min(int64(len(ba)), size-off))
		if _, err := io.ReadFull(fa, ba[:n]); err != nil {
			t.Fatalf("read %s at %d: %v", a, off, err)
		}
		if _, err := io.ReadFull(fb, bb[:n]); err != nil {
			t.Fatalf("read %s at %d: %v", b, off, err)
		}
		if bytes.Equal(ba[:n], bb[:n]) {
			continue
		}
		for i := 0; i < n; i++ {
			if ba[i] == bb[i] {
				continue
			}
			changed++
			if at := off + int64(i); !dirty[at/incGranularity] {
				t.Fatalf("%s: byte %d changed (%#02x -> %#02x), but its cluster %d is reported clean", what, at, ba[i], bb[i], at/incGranularity)
			}
		}
	}
	return changed
}

// incCheckDirty judges the dirty extents ext reported between base image
// a and target image b: each differing byte must lie in them, each
// cluster mustWrite wrote must be among them, and no cluster outside
// mayWrite. It returns the bytes that differ.
func incCheckDirty(t *testing.T, what, a, b string, size int64, ext []incExtent, mustWrite, mayWrite incClusters) int64 {
	t.Helper()
	dirty := incClustersOf(t, size, ext, what)
	for k := range dirty {
		if dirty[k] && !mayWrite[k] {
			t.Fatalf("%s: cluster %d (offset %d) is reported changed, but nothing was written there", what, k, int64(k)*incGranularity)
		}
		if mustWrite[k] && !dirty[k] {
			t.Fatalf("%s: cluster %d (offset %d) was written, but is reported clean", what, k, int64(k)*incGranularity)
		}
	}
	changed := incChanged(t, a, b, size, dirty, what)
	if got, bound := incBytes(ext), int64(mayWrite.count())*incGranularity; got > bound || got < changed {
		t.Fatalf("%s: %d bytes reported changed; want at most %d (the %d clusters written) and at least %d (the bytes that differ)",
			what, got, bound, mayWrite.count(), changed)
	}
	return changed
}

// incBackup is an incremental backup of target against base with stock
// tools, into full (which holds base's image): it reads the dirty extents
// of qemu:dirty-bitmap:BASE on target's export with nbdinfo, checks that
// qemu-img map, libnbd with both contexts and `nbdsnap diff` report the
// same, copies them with dd through nbdfuse, and proves with cmp that full
// is now target's image, which it keeps in targetImg. baseImg is base's
// image; must and may bound the dirty clusters (see incCheckDirty).
func incBackup(t *testing.T, d *daemon, dir, base, target, baseImg, full, targetImg string, size int64, must, may incClusters) []incExtent {
	t.Helper()
	what := fmt.Sprintf("qemu:dirty-bitmap:%s of %s", base, target)
	dirty := incNbdinfoDirty(t, d, target, base, size)
	incSame(t, "qemu-img map x-dirty-bitmap ("+what+")", incQemuImgDirty(t, d, target, base, size), dirty)
	incSame(t, "libnbd block status with base:allocation ("+what+")", incBothContexts(t, d, dir, target, base, size), dirty)
	incSame(t, "nbdsnap diff "+base+" "+target, incDiffRanges(t, incDiff(t, d, base, target)), dirty)

	start := time.Now()
	copied := incCopy(t, d, target, full, dirty)
	took := time.Since(start)
	incSave(t, d, target, targetImg)
	if out, err := exec.Command("cmp", full, targetImg).CombinedOutput(); err != nil {
		t.Fatalf("the incremental backup %s -> %s differs from an nbdcopy of %s: %v\n%s", base, target, target, err, out)
	}
	changed := incCheckDirty(t, what, baseImg, targetImg, size, dirty, must, may)
	t.Logf("incremental %s -> %s: %d extents, %d bytes copied by dd in %v (%d clusters written, %d bytes differ, export %d bytes)",
		base, target, len(dirty), copied, took.Round(time.Millisecond), may.count(), changed, size)
	if copied != incBytes(dirty) {
		t.Fatalf("dd copied %d bytes; the dirty extents hold %d", copied, incBytes(dirty))
	}
	return dirty
}

// incCopyFile copies a file (a backup, kept before it is updated).
func incCopyFile(t *testing.T, src, dst string) {
	t.Helper()
	run(t, "cp", "--sparse=always", src, dst)
}

// incSnap returns snapshot name's status.
func incSnap(t *testing.T, d *daemon, name string) control.SnapshotInfo {
	t.Helper()
	for _, s := range d.status(t).Snapshots {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("snapshot %q is not listed", name)
	return control.SnapshotInfo{}
}

// incWantSnap checks a snapshot's CBT fields in status --json.
func incWantSnap(t *testing.T, d *daemon, name string, bookmark bool, bases ...string) control.SnapshotInfo {
	t.Helper()
	s := incSnap(t, d, name)
	if s.State != control.StateValid || s.Bookmark != bookmark || s.Served == bookmark || s.Granularity != incGranularity ||
		s.Generation == "" || s.Generation != s.UUID || !slices.Equal(s.DiffBases, bases) {
		t.Fatalf("status --json of %q: state %s bookmark %v served %v granularity %d generation %q (uuid %q) diff_bases %q; "+
			"want valid, bookmark %v, served %v, granularity %d, the store's UUID, diff_bases %q",
			name, s.State, s.Bookmark, s.Served, s.Granularity, s.Generation, s.UUID, s.DiffBases,
			bookmark, !bookmark, incGranularity, bases)
	}
	return s
}

// incAllocated is the disk space a file takes.
func incAllocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// incNotServed fails the test if export can be opened.
func incNotServed(t *testing.T, d *daemon, export string) {
	t.Helper()
	if out, err := exec.Command("nbdinfo", "--size", d.uri(export)).CombinedOutput(); err == nil {
		t.Fatalf("export %q is served: nbdinfo --size says %s", export, out)
	}
}

// TestIncrementalBackup: the incremental backup of the README, with
// unmodified tools, on a 1 GiB origin with random data in parts. A full
// nbdcopy of s1; writes, write-zeroes and discards through the origin
// export; s2; the extents qemu:dirty-bitmap:s1 of s2's export reports
// (nbdinfo --map; the same from qemu-img map with x-dirty-bitmap, from
// libnbd with base:allocation negotiated too, and from `nbdsnap diff`)
// copied with dd through nbdfuse make the full copy equal to an nbdcopy of
// s2 (cmp), reading no more than the clusters written and every byte that
// changed. Then more writes, kill -9 at once, a restart: the contexts
// report exactly what they did, the writes before the kill are not lost
// incRequire skips (or, in CI, fails) unless the e2e tests run as root
// (nbdfuse mounts) with every tool the incremental tests use.
func incRequire(t *testing.T) {
	t.Helper()
	e2e(t)
	testenv.RequireRoot(t)
	for _, tool := range []string{"nbdcopy", "nbdinfo", "nbdfuse", "qemu-img", "qemu-io", "dd", "cmp"} {
		testenv.RequireTool(t, tool)
	}
}

// from them, and the next incremental (s2 -> s3) is exact too.
func TestIncrementalBackup(t *testing.T) {
	incRequire(t)
	const size = 1 << 30
	r := incRand(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	incOrigin(t, r, p("origin.img"), size)
	d := startDaemon(t, dir, p("origin.img"))

	mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", p("s1.cow"))
	incSave(t, d, "s1", p("s1.img"))
	incCopyFile(t, p("s1.img"), p("full.img"))
	incWantSnap(t, d, "s1", false)

	w1 := incRandomOps(r, size, 40, true)
	incApply(t, d, w1)
	mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", p("s2.cow"))
	incWantSnap(t, d, "s2", false, "s1")
	contexts := map[string][]string{"data": {"s1", "s2"}, "s1": {}, "s2": {"s1"}}
	incWantContexts(t, d, contexts, "after s2")
	must1, may1 := newIncClusters(size).add(w1, true), newIncClusters(size).add(w1, false)
	dirty12 := incBackup(t, d, dir, "s1", "s2", p("s1.img"), p("full.img"), p("s2.img"), size, must1, may1)

	// Writes, and at once kill -9: the marks of the acknowledged writes
	// must have been made durable with them.
	w2 := incRandomOps(r, size, 40, true)
	incApply(t, d, w2)
	d.kill9()
	d = startDaemon(t, dir, p("origin.img"))
	incWantContexts(t, d, contexts, "after kill -9 and restart")
	incWantSnap(t, d, "s2", false, "s1")
	incSame(t, "after kill -9 and restart, qemu:dirty-bitmap:s1 of s2", incNbdinfoDirty(t, d, "s2", "s1", size), dirty12)
	incSave(t, d, "data", p("now.img"))
	sinceS2 := incNbdinfoDirty(t, d, "data", "s2", size)
	incCheckDirty(t, "after kill -9 and restart, qemu:dirty-bitmap:s2 of the origin", p("s2.img"), p("now.img"), size, sinceS2,
		newIncClusters(size).add(w2, true), newIncClusters(size).add(w2, false))
	incSame(t, "nbdsnap diff s2 (the origin)", incDiffRanges(t, incDiff(t, d, "s2", "")), sinceS2)

	w3 := incRandomOps(r, size, 40, true)
	incApply(t, d, w3)
	mustCLI(t, "create", "s3", "--control", d.ctl, "--backing", p("s3.cow"))
	incWantSnap(t, d, "s3", false, "s1", "s2")
	incWantContexts(t, d, map[string][]string{"data": {"s1", "s2", "s3"}, "s1": {}, "s2": {"s1"}, "s3": {"s1", "s2"}}, "after s3")
	// What a client that lists the namespace (oVirt imageio does, and then
	// uses the bitmap only if there is one) is told: every base.
	for export, want := range map[string][]string{"s2": {"s1"}, "s3": {"s1", "s2"}, "data": {"s1", "s2", "s3"}} {
		if got := incPrefixList(t, d, dir, export); !slices.Equal(got, want) {
			t.Fatalf("NBD_OPT_LIST_META_CONTEXT qemu:dirty-bitmap: on %s lists %v; want %v", export, got, want)
		}
	}
	must23 := newIncClusters(size).add(w2, true).add(w3, true)
	may23 := newIncClusters(size).add(w2, false).add(w3, false)
	incBackup(t, d, dir, "s2", "s3", p("s2.img"), p("full.img"), p("s3.img"), size, must23, may23)
	// And s1 -> s3 across the crash, judged against the images.
	all := newIncClusters(size).add(w1, false).add(w2, false).add(w3, false)
	dirty13 := incNbdinfoDirty(t, d, "s3", "s1", size)
	incCheckDirty(t, "qemu:dirty-bitmap:s1 of s3", p("s1.img"), p("s3.img"), size, dirty13,
		newIncClusters(size).add(w1, true).add(w2, true).add(w3, true), all)
	incSame(t, "nbdsnap diff s1 s3", incDiffRanges(t, incDiff(t, d, "s1", "s3")), dirty13)
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
}

// TestIncrementalBookmark: s1 is turned into a bookmark between two
// rounds of writes. Its export goes and its store shrinks to the bookmark,
// but s2, taken afterwards, reports every cluster written since s1, before
// and after the bookmark, and the incremental backup from the full copy
// of s1 through it is exact. A restart keeps the bookmark (and s3, taken
// after it, reports the changes since s1 across it); `clear s1` deletes it
// with its file, and the context goes from every export; a connection
// that had selected it gets an error from its next block status.
func TestIncrementalBookmark(t *testing.T) {
	incRequire(t)
	const size = 64 << 20
	r := incRand(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	incOrigin(t, r, p("origin.img"), size)
	d := startDaemon(t, dir, p("origin.img"))

	mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", p("s1.cow"))
	incSave(t, d, "s1", p("s1.img"))
	incCopyFile(t, p("s1.img"), p("full.img"))
	// Writes of 1..256 KiB each: s1 copies what they overwrite.
	w1 := incRandomOps(r, size, 30, false)
	incApply(t, d, w1)
	uuid := incWantSnap(t, d, "s1", false).UUID
	before := incAllocated(t, p("s1.cow"))

	if out := mustCLI(t, "clear", "s1", "--bookmark", "--control", d.ctl); !strings.Contains(out, "bookmark") {
		t.Fatalf("clear s1 --bookmark printed %q", out)
	}
	if s := incWantSnap(t, d, "s1", true); s.UUID != uuid {
		t.Fatalf("the bookmark's generation is %q; the snapshot's was %q", s.Generation, uuid)
	}
	incNotServed(t, d, "s1")
	after := incAllocated(t, p("s1.cow"))
	t.Logf("s1.cow takes %d bytes on disk as a snapshot, %d as a bookmark", before, after)
	if before < 1<<20 || after*2 > before {
		t.Fatalf("s1.cow takes %d bytes on disk as a snapshot and %d as a bookmark; want at least 1 MiB, then less than half", before, after)
	}
	if out := mustCLI(t, "list", "--control", d.ctl); !regexp.MustCompile(`(?m)^s1: .*bookmark`).MatchString(out) {
		t.Fatalf("list does not say s1 is a bookmark:\n%s", out)
	}

	w2 := incRandomOps(r, size, 30, false)
	incApply(t, d, w2)
	mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", p("s2.cow"))
	incWantSnap(t, d, "s2", false, "s1")
	incWantContexts(t, d, map[string][]string{"data": {"s1", "s2"}, "s2": {"s1"}}, "with s1 a bookmark")
	// Every cluster written since s1, before and after it became a
	// bookmark, exactly.
	w12 := newIncClusters(size).add(w1, false).add(w2, false)
	incBackup(t, d, dir, "s1", "s2", p("s1.img"), p("full.img"), p("s2.img"), size, w12, w12)

	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	d = startDaemon(t, dir, p("origin.img"))
	incWantSnap(t, d, "s1", true)
	incWantSnap(t, d, "s2", false, "s1")
	incNotServed(t, d, "s1")
	incWantContexts(t, d, map[string][]string{"data": {"s1", "s2"}, "s2": {"s1"}}, "after a restart")
	if now := incAllocated(t, p("s1.cow")); now > after {
		t.Fatalf("after a restart the bookmark's store takes %d bytes on disk; it took %d", now, after)
	}
	w3 := incRandomOps(r, size, 30, false)
	incApply(t, d, w3)
	mustCLI(t, "create", "s3", "--control", d.ctl, "--backing", p("s3.cow"))
	w123 := newIncClusters(size).add(w1, false).add(w2, false).add(w3, false)
	incCopyFile(t, p("s1.img"), p("full.img"))
	incBackup(t, d, dir, "s1", "s3", p("s1.img"), p("full.img"), p("s3.img"), size, w123, w123)

	// A connection that selected qemu:dirty-bitmap:s1 before the clear
	// gets an error afterwards, not an answer.
	held := incHoldContext(t, d, dir, "s3", "qemu:dirty-bitmap:s1")
	if out := mustCLI(t, "clear", "s1", "--control", d.ctl); !strings.Contains(out, "cleared") {
		t.Fatalf("clear s1 printed %q", out)
	}
	if got := held(); !strings.HasPrefix(got, "error") || !strings.Contains(got, "EIO") {
		t.Fatalf("block status of qemu:dirty-bitmap:s1 on a connection to s3 opened before s1 was cleared: %q; want an error", got)
	}
	for _, s := range d.status(t).Snapshots {
		if s.Name == "s1" {
			t.Fatalf("s1 still listed after clear: %+v", s)
		}
	}
	if _, err := os.Stat(p("s1.cow")); !os.IsNotExist(err) {
		t.Fatalf("the bookmark's store is still there after clear: %v", err)
	}
	incWantSnap(t, d, "s2", false)
	incWantSnap(t, d, "s3", false, "s2")
	incWantContexts(t, d, map[string][]string{"data": {"s2", "s3"}, "s2": {}, "s3": {"s2"}}, "after clear s1")
	if _, errs, code := cli(t, "diff", "s1", "s3", "--control", d.ctl); code != 1 || !strings.Contains(errs, `"s1"`) {
		t.Fatalf("diff against the cleared bookmark: exit %d: %s", code, errs)
	}
	if err := d.stop(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
}

// TestIncrementalBookmarkCrash: the daemon is killed at "bookmark:store",
// after the store became a bookmark and before its record says so, with a
// file store and with a device store. The restart completes the bookmark:
// listed as one (also in its record), not served, and s2, taken after the
// restart, reports exactly the clusters written since s1, before the crash
// and after; the incremental backup through it is exact.
func TestIncrementalBookmarkCrash(t *testing.T) {
	incRequire(t)
	const point = "bookmark:store"
	for _, kind := range crashStoreKinds {
		t.Run(kind, func(t *testing.T) {
			const size = 16 << 20
			r := incRand(t)
			dir := t.TempDir()
			p := func(name string) string { return filepath.Join(dir, name) }
			incOrigin(t, r, p("origin.img"), size)
			st := crashNewStore(t, dir, kind)

			d := crashStartAt(t, dir, p("origin.img"), point)
			mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", st.backing)
			incSave(t, d, "s1", p("s1.img"))
			incCopyFile(t, p("s1.img"), p("full.img"))
			w1 := incRandomOps(r, size, 20, false)
			incApply(t, d, w1)
			if _, errs, code := cli(t, "clear", "s1", "--bookmark", "--control", d.ctl); code != 1 {
				t.Fatalf("clear --bookmark with the daemon dying at %s: exit %d (%s); want 1", point, code, errs)
			}
			crashDied(t, d, point)
			if incRecordBookmark(t, d.state, "s1") {
				t.Fatalf("after a crash at %s the record already says bookmark: the crash point is not between store and record", point)
			}

			d = startDaemon(t, dir, p("origin.img"))
			incWantSnap(t, d, "s1", true)
			incNotServed(t, d, "s1")
			if !incRecordBookmark(t, d.state, "s1") {
				t.Fatalf("after the restart the record of s1 does not say bookmark")
			}
			if kind == "file" {
				if n := incAllocated(t, st.backing); n > 1<<20 {
					t.Fatalf("the bookmark's store takes %d bytes on disk after the restart", n)
				}
			}
			w2 := incRandomOps(r, size, 20, false)
			incApply(t, d, w2)
			mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", p("s2.cow"))
			incWantSnap(t, d, "s2", false, "s1")
			w12 := newIncClusters(size).add(w1, false).add(w2, false)
			incBackup(t, d, dir, "s1", "s2", p("s1.img"), p("full.img"), p("s2.img"), size, w12, w12)

			// And it goes like any bookmark.
			mustCLI(t, "clear", "s1", "--control", d.ctl)
			if kind == "file" {
				crashStoreGone(t, st)
			}
			incWantContexts(t, d, map[string][]string{"data": {"s2"}, "s2": {}}, "after clear s1")
		})
	}
}

// heldContextPy connects to an export with one meta context, checks that
// block status answers, prints "ready", and after a line on stdin asks
// again, printing "answered ..." or "error ...".
const heldContextPy = `
import nbd, sys
uri, ctx = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
if not h.can_meta_context(ctx):
    sys.exit("the server did not agree to " + ctx)
def status():
    got = []
    h.block_status(h.get_size(), 0, lambda c, o, e, err: got.append((c, e[:4])) or 0)
    return got
if not status():
    sys.exit("no extents for " + ctx)
print("ready", flush=True)
sys.stdin.readline()
try:
    print("answered", status(), flush=True)
except nbd.Error as ex:
    print("error", ex, flush=True)
h.shutdown()
`

// incHoldContext opens a libnbd connection to export with context
// selected and returns a function that, called later, asks for its block
// status again on the same connection and returns what heldContextPy
// printed.
func incHoldContext(t *testing.T, d *daemon, dir, export, context string) func() string {
	t.Helper()
	return holdLibnbd(t, dir, "held-context.py", heldContextPy, d.uri(export), context)
}

// holdLibnbd runs a python3-libnbd script that holds a connection: it
// prints "ready" once connected, then waits for a line on stdin and prints
// one line of answer. holdLibnbd returns once the script is ready; the
// function it returns sends the line, waits for the script to end and
// returns its answer, trimmed. A script that fails fails the test.
func holdLibnbd(t *testing.T, dir, name, script string, args ...string) func() string {
	t.Helper()
	py := incRequireLibnbd(t)
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(py, append([]string{path}, args...)...)
	errs := &testenv.SyncBuffer{}
	cmd.Stderr = errs
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ended := false
	t.Cleanup(func() {
		if !ended {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	lines := bufio.NewReader(stdout)
	if line, err := lines.ReadString('\n'); line != "ready\n" {
		t.Fatalf("%s %v: %q, %v\n%s", name, args, line, err, errs.String())
	}
	return func() string {
		t.Helper()
		stdin.Write([]byte("\n"))
		line, _ := lines.ReadString('\n')
		ended = true
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, errs.String())
		}
		return strings.TrimSpace(line)
	}
}

// incRecordBookmark reads whether snapshot name's state record says it is
// a bookmark.
func incRecordBookmark(t *testing.T, state, name string) bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "snap-"+name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var r struct{ Bookmark bool }
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("record of %q: %v\n%s", name, err, b)
	}
	return r.Bookmark
}

// incState is what a refused request must not change: every snapshot's
// fields that diff and bookmark could touch, the exports and their
// contexts, the files in the store directory and the state records.
func incState(t *testing.T, d *daemon, dir string) string {
	t.Helper()
	var b strings.Builder
	for _, s := range d.status(t).Snapshots {
		fmt.Fprintf(&b, "%s %s %q bookmark=%v served=%v persistent=%v uuid=%s bases=%v\n",
			s.Name, s.State, s.Reason, s.Bookmark, s.Served, s.Persistent, s.UUID, s.DiffBases)
	}
	fmt.Fprintf(&b, "contexts %v\n", incContexts(t, d))
	// The stores by name (a writer may still be settling their contents),
	// the records byte for byte.
	for _, sub := range []string{dir, d.state} {
		ents, err := os.ReadDir(sub)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if !e.Type().IsRegular() {
				continue
			}
			fmt.Fprintf(&b, "%s", e.Name())
			if sub == d.state {
				rec, err := os.ReadFile(filepath.Join(sub, e.Name()))
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(&b, " %s", sha(rec))
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

// TestIncrementalRefusals: a diff against a snapshot created after the
// target, against a transient snapshot, against an invalid one (which
// also loses its context on the later snapshot's export, and a connection
// that had selected it gets an error), against a name
// that does not exist, and `clear --bookmark` of a transient, an invalid
// snapshot or a bookmark: each exits 1 with one line naming the snapshot
// and why, and changes nothing.
func TestIncrementalRefusals(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	testenv.RequireTool(t, "nbdinfo")
	incRequireLibnbd(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 16<<20)
	d := startDaemon(t, dir, origin)
	create := func(name string, args ...string) {
		mustCLI(t, append([]string{"create", name, "--control", d.ctl, "--backing", filepath.Join(dir, name+".cow")}, args...)...)
	}
	create("s1")
	create("t", "--transient")
	create("inv", "--max-size", "128K")
	create("s2")
	create("s3")
	create("bm")
	mustCLI(t, "clear", "bm", "--bookmark", "--control", d.ctl)
	incWantSnap(t, d, "s2", false, "s1", "inv")
	// A connection to s2 that selected inv's context before inv turns
	// invalid (its store cannot hold what this write copies) gets an error
	// afterwards, not an answer.
	held := incHoldContext(t, d, dir, "s2", "qemu:dirty-bitmap:inv")
	run(t, "qemu-io", "-f", "raw", "-c", "write -q -P 7 1M 2M", d.uri("data"))
	if s := incSnap(t, d, "inv"); s.State != control.StateInvalid {
		t.Fatalf("inv is %s after outgrowing --max-size: %+v", s.State, s)
	}
	if got := held(); !strings.HasPrefix(got, "error") || !strings.Contains(got, "EIO") {
		t.Fatalf("block status of qemu:dirty-bitmap:inv on a connection to s2 opened before inv turned invalid: %q; want an error", got)
	}
	incWantSnap(t, d, "s2", false, "s1")
	incWantContexts(t, d, map[string][]string{"data": {"s1", "s2", "s3", "bm"}, "s1": {}, "t": {}, "inv": {}, "s2": {"s1"}, "s3": {"s1", "s2"}},
		"inv invalid")

	refusals := []struct {
		args []string
		want []string // in the one line of stderr
	}{
		{[]string{"diff", "s3", "s2"}, []string{`"s3"`, "s2", "cannot report"}},
		{[]string{"diff", "s2", "s1"}, []string{`"s2"`, "s1", "cannot report"}},
		{[]string{"diff", "t", "s2"}, []string{`"t"`, "cannot report"}},
		{[]string{"diff", "t"}, []string{`"t"`, "cannot report"}},
		{[]string{"diff", "inv", "s2"}, []string{`"inv"`, "cannot report"}},
		{[]string{"diff", "inv"}, []string{`"inv"`, "cannot report"}},
		{[]string{"diff", "nope", "s2"}, []string{`"nope"`, "not found"}},
		{[]string{"diff", "s1", "nope"}, []string{`"nope"`, "not found"}},
		{[]string{"diff", "s1", "bm"}, []string{"bm"}},
		{[]string{"clear", "t", "--bookmark"}, []string{`"t"`, "transient"}},
		{[]string{"clear", "inv", "--bookmark"}, []string{`"inv"`, "invalid"}},
		{[]string{"clear", "bm", "--bookmark"}, []string{`"bm"`, "bookmark already"}},
	}
	before := incState(t, d, dir)
	for _, c := range refusals {
		out, errs, code := cli(t, append(c.args, "--control", d.ctl)...)
		line := strings.TrimSpace(errs)
		if code != 1 || out != "" || strings.Count(line, "\n") != 0 || !strings.HasPrefix(line, "nbdsnap: ") {
			t.Errorf("nbdsnap %s: exit %d, stdout %q, stderr %q; want exit 1 and one line on stderr", strings.Join(c.args, " "), code, out, errs)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(line, w) {
				t.Errorf("nbdsnap %s: %q does not say %q", strings.Join(c.args, " "), line, w)
			}
		}
		t.Logf("nbdsnap %s: %s", strings.Join(c.args, " "), line)
		if now := incState(t, d, dir); now != before {
			t.Fatalf("nbdsnap %s changed the daemon's state:\nbefore:\n%s\nafter:\n%s", strings.Join(c.args, " "), before, now)
		}
	}
	// The exports still read.
	for _, s := range []string{"s1", "t", "s2", "s3"} {
		run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -q 0 64k", d.uri(s))
	}
}

// incWaitWrites polls snapshot name's cow_calls (origin writes that
// consulted it) until n more than from have been counted.
func incWaitWrites(t *testing.T, d *daemon, name string, from, n int64) int64 {
	t.Helper()
	var now int64
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if now = incSnap(t, d, name).Stats.CowCalls; now >= from+n {
			return now
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d writes under %s after 10s; waited for %d", now-from, name, n)
		}
	}
}

// TestIncrementalUnderWriteLoad: four libnbd connections write 16 KiB
// blocks to the first 8 MiB of a 64 MiB origin while s2 and s3 are taken
// (s1 before the load). Whatever the create instants cut through, the
// chain of incremental backups s1 -> s2 -> s3 through the dirty-bitmap
// contexts, each applied to the previous image, gives each snapshot's
// image exactly (cmp), no block outside the written 8 MiB is reported, and
// after the load the origin's qemu:dirty-bitmap:s3 covers every byte that
// differs from s3.
func TestIncrementalUnderWriteLoad(t *testing.T) {
	incRequire(t)
	const (
		size     = 64 << 20
		bs       = 16 << 10
		blocks   = 512 // the first 8 MiB
		nthreads = 4
		seconds  = 6.0
	)
	r := incRand(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	incOrigin(t, r, p("origin.img"), size)
	d := startDaemon(t, dir, p("origin.img"))
	mustCLI(t, "create", "s1", "--control", d.ctl, "--backing", p("s1.cow"))
	incSave(t, d, "s1", p("s1.img"))
	incCopyFile(t, p("s1.img"), p("full.img"))

	w, _ := startWriter(t, dir, d.uri("data"), blocks, bs, nthreads, seconds)
	incWaitWrites(t, d, "s1", 0, 3000)
	mustCLI(t, "create", "s2", "--control", d.ctl, "--backing", p("s2.cow"))
	incWaitWrites(t, d, "s2", 0, 3000)
	mustCLI(t, "create", "s3", "--control", d.ctl, "--backing", p("s3.cow"))
	incWaitWrites(t, d, "s3", 0, 3000)
	if err := w.Wait(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	t.Logf("writes: %d under s1, %d under s2, %d under s3", incSnap(t, d, "s1").Stats.CowCalls,
		incSnap(t, d, "s2").Stats.CowCalls, incSnap(t, d, "s3").Stats.CowCalls)

	written := newIncClusters(size)
	written.touch(0, blocks*bs)
	none := newIncClusters(size)
	incBackup(t, d, dir, "s1", "s2", p("s1.img"), p("full.img"), p("s2.img"), size, none, written)
	incBackup(t, d, dir, "s2", "s3", p("s2.img"), p("full.img"), p("s3.img"), size, none, written)
	incSave(t, d, "data", p("now.img"))
	incCheckDirty(t, "qemu:dirty-bitmap:s3 of the origin after the load", p("s3.img"), p("now.img"), size,
		incNbdinfoDirty(t, d, "data", "s3", size), none, written)
}

// TestIncrementalBaseLimit: a snapshot records its 31 newest bases (the
// store header's table). With 33 persistent snapshots and bookmarks before
// it, the two oldest are not among its diff bases or contexts and a diff
// against them is refused; the newest 31 answer.
func TestIncrementalBaseLimit(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 4<<20)
	d := startDaemon(t, dir, origin)
	var names []string
	for i := range 33 {
		name := fmt.Sprintf("b%02d", i)
		mustCLI(t, "create", name, "--control", d.ctl, "--backing", filepath.Join(dir, name+".cow"))
		if i%2 == 1 {
			mustCLI(t, "clear", name, "--bookmark", "--control", d.ctl)
		}
		names = append(names, name)
	}
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))
	incWantSnap(t, d, "s", false, names[2:]...)
	if got := incContexts(t, d)["s"]; !slices.Equal(got, names[2:]) {
		t.Fatalf("export s offers qemu:dirty-bitmap contexts for %v; want %v", got, names[2:])
	}
	for _, base := range names[:2] {
		if _, errs, code := cli(t, "diff", base, "s", "--control", d.ctl); code != 1 || !strings.Contains(errs, "cannot report") {
			t.Fatalf("diff %s s (the base beyond the 31 newest): exit %d: %s", base, code, errs)
		}
	}
	incDiff(t, d, names[2], "s")
	// The origin answers for every one of them.
	incDiff(t, d, names[0], "")
}
