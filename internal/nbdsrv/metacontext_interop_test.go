package nbdsrv_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// Meta context negotiation as libnbd (nbdsh's python3-libnbd, nbdinfo)
// drives it, against an export with two dirty bitmaps, qemu:dirty-bitmap:a
// and qemu:dirty-bitmap:b. The same body runs against qemu-nbd serving a
// qcow2 image with the same two bitmaps and the same data, so that every
// expectation is first met by the server that defined the namespace.

// The layout both servers serve: 8 MiB, data in two 64 KiB clusters (holes
// elsewhere); bitmap a dirty over the first, b over both.
const metaSize = 8 << 20

var (
	metaData  = [][2]int64{{64 << 10, 128 << 10}, {4 << 20, 4<<20 + 64<<10}}
	metaDirty = map[string][][2]int64{"a": metaData[:1], "b": metaData}
)

// droppableBitmap is a dirtyBitmap the test can take off the export's
// list; from then on it fails, as the daemon's contexts do.
type droppableBitmap struct {
	dirtyBitmap
	dropped atomic.Bool
}

func (d *droppableBitmap) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	if d.dropped.Load() {
		return nil, fmt.Errorf("context %s was removed: %w", d.Name(), syscall.EIO)
	}
	return d.dirtyBitmap.Extents(ctx, off, length)
}

// metaServer is a server of the layout; drop, for ours, takes a context
// off the list.
type metaServer struct {
	*server
	drop func(name string)
}

func startOursMeta(t *testing.T) metaServer {
	src := sparseImage(t, metaSize, metaData...)
	var mu sync.Mutex
	var list []*droppableBitmap
	for _, n := range []string{"a", "b"} {
		list = append(list, &droppableBitmap{dirtyBitmap: dirtyBitmap{name: n, size: metaSize, dirty: metaDirty[n]}})
	}
	contexts := func() []nbdsrv.MetaContext {
		mu.Lock()
		defer mu.Unlock()
		var l []nbdsrv.MetaContext
		for _, d := range list {
			l = append(l, d)
		}
		return l
	}
	drop := func(name string) {
		mu.Lock()
		defer mu.Unlock()
		list = slices.DeleteFunc(list, func(d *droppableBitmap) bool {
			if d.Name() == name {
				d.dropped.Store(true)
				return true
			}
			return false
		})
	}
	return metaServer{server: startOurs(t, fileExport{name: "disk", path: src, contexts: contexts}), drop: drop}
}

// startQemuMeta serves the layout with qemu-nbd: a qcow2 image whose
// bitmaps a and b both record the first write, and b alone the second.
func startQemuMeta(t *testing.T) metaServer {
	qemuNbd := testenv.RequireTool(t, "qemu-nbd")
	dir := tempDir(t)
	img := filepath.Join(dir, "meta.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, strconv.Itoa(metaSize))
	run(t, "qemu-img", "bitmap", "--add", img, "a")
	run(t, "qemu-img", "bitmap", "--add", img, "b")
	w := func(r [2]int64) string { return fmt.Sprintf("write -P 0x5a %d %d", r[0], r[1]-r[0]) }
	run(t, "qemu-io", "-f", "qcow2", "-c", w(metaData[0]), img)
	run(t, "qemu-img", "bitmap", "--disable", img, "a")
	run(t, "qemu-io", "-f", "qcow2", "-c", w(metaData[1]), img)
	sock := filepath.Join(dir, "qemu.sock")
	cmd := exec.Command(qemuNbd, "-k", sock, "-t", "-r", "-f", "qcow2", "-x", "disk", "-B", "a", "-B", "b", img)
	return metaServer{server: runPeer(t, "qemu-nbd", cmd, sock)}
}

// metaScript is the libnbd side. It prints one JSON document; with drop
// set it first prints "connected" once a connection has selected
// qemu:dirty-bitmap:b, and waits for a line on stdin (the test takes b off
// the list meanwhile) before it asks that connection for block status.
const metaScript = `
import json, sys, nbd
res = {}

def listing(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    names = []
    def cb(name):
        names.append(name)
        return 0
    h.opt_list_meta_context(cb)
    h.opt_abort()
    return sorted(names)

res["list"] = {
    "none": listing([]),
    "qemu:": listing(["qemu:"]),
    "qemu:dirty-bitmap:": listing(["qemu:dirty-bitmap:"]),
    "base:": listing(["base:"]),
    "x-foo:bar": listing(["x-foo:bar"]),
    "exact": listing(["qemu:dirty-bitmap:b", "qemu:dirty-bitmap:nope"]),
    "nocolon": listing(["nocolon", "base:allocation"]),
}

def connect(queries):
    h = nbd.NBD()
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    return h

names = ["base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]

# A bare prefix selects nothing: no context, and block status is refused.
h = connect(["qemu:"])
res["prefix_set"] = [n for n in names if h.can_meta_context(n)]
try:
    h.block_status(4096, 0, lambda *a: 0)
    res["prefix_block_status"] = "ok"
except nbd.Error as e:
    res["prefix_block_status"] = "refused"
h.shutdown()

# The extents of every selected context over the whole export, in as many
# requests as the server needs, as [offset, length, flags] runs.
def extents(h, flags=0):
    runs = {}
    off = 0
    while off < size:
        got = {}
        def cb(ctx, o, entries, err):
            got[ctx] = (o, list(entries))
            return 0
        h.block_status(size - off, off, cb, flags)
        step = size - off
        for ctx, (o, entries) in got.items():
            pos = o
            for i in range(0, len(entries), 2):
                runs.setdefault(ctx, []).append([pos, entries[i], entries[i + 1]])
                pos += entries[i]
            step = min(step, pos - off)
        if flags:
            return runs
        off += step
    return runs

h = connect(["base:allocation", "qemu:dirty-bitmap:a"])
res["set"] = [n for n in names if h.can_meta_context(n)]
res["extents"] = extents(h)
res["req_one"] = extents(h, nbd.CMD_FLAG_REQ_ONE)
h.shutdown()

if drop:
    h = connect(["qemu:dirty-bitmap:b"])
    print("connected", flush=True)
    sys.stdin.readline()
    try:
        h.block_status(size, 0, lambda *a: 0)
        res["dropped"] = "ok"
    except nbd.Error as e:
        res["dropped"] = e.errnum
    h.shutdown()

print(json.dumps(res), flush=True)
`

// metaResult is what metaScript prints.
type metaResult struct {
	List              map[string][]string
	PrefixSet         []string `json:"prefix_set"`
	PrefixBlockStatus string   `json:"prefix_block_status"`
	Set               []string
	Extents           map[string][][3]int64
	ReqOne            map[string][][3]int64 `json:"req_one"`
	Dropped           any
}

// runMetaScript runs metaScript against s; drop, if set, is called while
// the script waits with a connection that selected qemu:dirty-bitmap:b.
func runMetaScript(t *testing.T, s metaServer) metaResult {
	t.Helper()
	testenv.RequireTool(t, "nbdsh") // the package that brings python3-libnbd along
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	prelude := fmt.Sprintf("uri = %q\nsize = %d\ndrop = %s\n", s.uri("disk"), metaSize, map[bool]string{true: "True", false: "False"}[s.drop != nil])
	cmd := exec.CommandContext(ctx, "/usr/bin/python3", "-c", prelude+metaScript)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var doc []byte
	br := bufio.NewReader(stdout)
	for {
		line, err := br.ReadBytes('\n')
		if bytes.Equal(line, []byte("connected\n")) {
			s.drop("qemu:dirty-bitmap:b")
			io.WriteString(stdin, "go\n")
			continue
		}
		doc = append(doc, line...)
		if err != nil {
			break
		}
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("python3-libnbd: %v\n%s%s", err, doc, stderr.Bytes())
	}
	var res metaResult
	if err := json.Unmarshal(bytes.TrimSpace(doc), &res); err != nil {
		t.Fatalf("%v\n%s%s", err, doc, stderr.Bytes())
	}
	return res
}

// wantRuns is the layout as [offset, length, flags] runs: ranges flagged
// in, unflagged out.
func wantRuns(ranges [][2]int64, in, out int64) [][3]int64 {
	var runs [][3]int64
	pos := int64(0)
	for _, r := range ranges {
		if r[0] > pos {
			runs = append(runs, [3]int64{pos, r[0] - pos, out})
		}
		runs = append(runs, [3]int64{r[0], r[1] - r[0], in})
		pos = r[1]
	}
	if pos < metaSize {
		runs = append(runs, [3]int64{pos, metaSize - pos, out})
	}
	return runs
}

// merged joins neighbouring runs of equal flags (a server may split a run
// over requests or descriptors).
func merged(runs [][3]int64) [][3]int64 {
	var out [][3]int64
	for _, r := range runs {
		if n := len(out); n > 0 && out[n-1][2] == r[2] && out[n-1][0]+out[n-1][1] == r[0] {
			out[n-1][1] += r[1]
			continue
		}
		out = append(out, r)
	}
	return out
}

// metaServers are the servers of the layout, ours and the reference.
var metaServers = map[string]func(*testing.T) metaServer{"nbdsrv": startOursMeta, "qemu-nbd": startQemuMeta}

func TestMetaContextNegotiationLibnbd(t *testing.T) {
	for kind, start := range metaServers {
		t.Run(kind, func(t *testing.T) {
			s := start(t)
			res := runMetaScript(t, s)
			all := []string{"base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"}
			for q, want := range map[string][]string{
				"none":               all,
				"qemu:":              all[1:],
				"qemu:dirty-bitmap:": all[1:],
				"base:":              all[:1],
				"x-foo:bar":          nil,
				"exact":              all[2:],
				"nocolon":            all[:1], // ignored, not refused
			} {
				if got := res.List[q]; !slices.Equal(got, want) {
					t.Errorf("LIST %s = %q, want %q", q, got, want)
				}
			}
			if len(res.PrefixSet) != 0 || res.PrefixBlockStatus != "refused" {
				t.Errorf("SET qemu: selected %q, block status %s", res.PrefixSet, res.PrefixBlockStatus)
			}
			if !slices.Equal(res.Set, all[:2]) {
				t.Errorf("SET base:allocation, qemu:dirty-bitmap:a selected %q", res.Set)
			}
			const hole = 3 // NBD_STATE_HOLE|NBD_STATE_ZERO
			if got, want := merged(res.Extents["base:allocation"]), wantRuns(metaData, 0, hole); !slices.Equal(got, want) {
				t.Errorf("base:allocation %v, want %v", got, want)
			}
			if got, want := merged(res.Extents["qemu:dirty-bitmap:a"]), wantRuns(metaDirty["a"], 1, 0); !slices.Equal(got, want) {
				t.Errorf("qemu:dirty-bitmap:a %v, want %v", got, want)
			}
			if _, ok := res.Extents["qemu:dirty-bitmap:b"]; ok || len(res.Extents) != 2 {
				t.Errorf("extents of contexts not selected: %v", res.Extents)
			}
			// REQ_ONE: exactly one extent per context, the first.
			want1 := map[string][][3]int64{"base:allocation": {{0, 64 << 10, hole}}, "qemu:dirty-bitmap:a": {{0, 64 << 10, 0}}}
			if len(res.ReqOne) != 2 {
				t.Errorf("REQ_ONE: %v", res.ReqOne)
			}
			for ctx, want := range want1 {
				if got := res.ReqOne[ctx]; !slices.Equal(got, want) {
					t.Errorf("REQ_ONE %s: %v, want %v", ctx, got, want)
				}
			}
			if s.drop != nil {
				// b was selected, then taken off the list: an error
				// reply (EIO), the connection still usable for shutdown.
				if v, ok := res.Dropped.(float64); !ok || int(v) != int(syscall.EIO) {
					t.Errorf("block status of a removed context: %v, want errno %d", res.Dropped, syscall.EIO)
				}
				if got := runMetaScript(t, metaServer{server: s.server}).List["none"]; !slices.Equal(got, all[:2]) {
					t.Errorf("LIST after the removal: %q", got)
				}
			}
		})
	}
}

// nbdinfo lists an export's contexts and maps a dirty bitmap as dirty and
// clean.
func TestMetaContextNbdinfo(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	for kind, start := range metaServers {
		t.Run(kind, func(t *testing.T) {
			s := start(t)
			out := run(t, "nbdinfo", "--list", "--json", s.uri(""))
			var doc struct {
				Exports []struct {
					Name     string   `json:"export-name"`
					Contexts []string `json:"contexts"`
				} `json:"exports"`
			}
			if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Exports) != 1 {
				t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
			}
			got := slices.Sorted(slices.Values(doc.Exports[0].Contexts))
			if want := []string{"base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"}; !slices.Equal(got, want) {
				t.Errorf("contexts %q, want %q\n%s", got, want, out)
			}
			// Plain text: offset length type description.
			out = run(t, "nbdinfo", "--map=qemu:dirty-bitmap:a", s.uri("disk"))
			var runs [][3]int64
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				var off, n, typ int64
				var desc string
				if _, err := fmt.Sscan(line, &off, &n, &typ, &desc); err != nil {
					t.Fatalf("nbdinfo --map line %q: %v", line, err)
				}
				if want := map[int64]string{0: "clean", 1: "dirty"}[typ]; desc != want {
					t.Errorf("nbdinfo --map: type %d described %q, want %q", typ, desc, want)
				}
				runs = append(runs, [3]int64{off, n, typ})
			}
			if want := wantRuns(metaDirty["a"], 1, 0); !slices.Equal(merged(runs), want) {
				t.Errorf("nbdinfo --map=qemu:dirty-bitmap:a %v, want %v\n%s", runs, want, out)
			}
		})
	}
}
