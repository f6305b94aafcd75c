package nbdsrv_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv/filebackend"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// Real clients (libnbd's tools, qemu, fio, nbdfuse) against the server with
// a file backend. Where cheap, the same test body also runs against
// nbdkit's file plugin, so the body proves itself on a reference server
// before it judges ours.

// server is a running NBD server under test.
type server struct {
	kind string // "nbdsrv" or "nbdkit"
	sock string
	srv  *nbdsrv.Server // nil for nbdkit
}

func (s *server) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, s.sock)
}

func tempDir(t *testing.T) string {
	d := t.TempDir()
	if len(d) > 70 { // unix socket paths are short
		var err error
		if d, err = os.MkdirTemp("", "nbd"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
	}
	return d
}

// fileExport describes an export of a file for startOurs.
type fileExport struct {
	name, path string
	readOnly   bool
	contexts   func() []nbdsrv.MetaContext
}

// startOurs serves files with nbdsrv in this process.
func startOurs(t *testing.T, exps ...fileExport) *server {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s := nbdsrv.NewServer(nbdsrv.Config{Logger: log})
	for _, e := range exps {
		b, err := filebackend.Open(e.path, e.readOnly)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		size, err := b.Size()
		if err != nil {
			t.Fatal(err)
		}
		if err := s.AddExport(nbdsrv.Export{Name: e.name, Description: "file " + filepath.Base(e.path), Size: size,
			Backend: b, ReadOnly: e.readOnly, MultiConn: true, MetaContexts: e.contexts}); err != nil {
			t.Fatal(err)
		}
	}
	if len(exps) > 0 {
		s.SetDefaultExport(exps[0].name)
	}
	sock := filepath.Join(tempDir(t), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		<-done
	})
	return &server{kind: "nbdsrv", sock: sock, srv: s}
}

// startNbdkit runs nbdkit with the given plugin arguments.
func startNbdkit(t *testing.T, args ...string) *server {
	t.Helper()
	nbdkit := testenv.RequireTool(t, "nbdkit")
	sock := filepath.Join(tempDir(t), "kit.sock")
	return runPeer(t, "nbdkit", exec.Command(nbdkit, append([]string{"-f", "-U", sock}, args...)...), sock)
}

// runPeer starts cmd, another NBD server that listens on the unix socket
// sock, stops it when the test ends, and waits for the socket.
func runPeer(t *testing.T, kind string, cmd *exec.Cmd, sock string) *server {
	t.Helper()
	cmd.Stderr = testWriter{t}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i == 500 {
			t.Fatalf("%s did not create its socket", kind)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return &server{kind: kind, sock: sock}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// both runs body against nbdsrv and nbdkit serving the same file (a fresh
// copy of src for each).
func both(t *testing.T, src string, body func(t *testing.T, s *server, file string)) {
	for _, kind := range []string{"nbdsrv", "nbdkit"} {
		t.Run(kind, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "disk.img")
			copyFile(t, src, file)
			var s *server
			if kind == "nbdsrv" {
				s = startOurs(t, fileExport{name: "disk", path: file})
			} else {
				s = startNbdkit(t, "--export-name=disk", "file", file)
			}
			body(t, s, file)
		})
	}
}

func run(t *testing.T, tool string, args ...string) string {
	t.Helper()
	p := testenv.RequireTool(t, tool)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, p, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	// cp --sparse keeps the holes the map tests look for.
	if out, err := exec.Command("cp", "--sparse=always", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
}

// sparseImage makes a file of size bytes with random data in the given
// [start, end) ranges and holes elsewhere.
func sparseImage(t *testing.T, size int64, data ...[2]int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, r := range data {
		b := make([]byte, r[1]-r[0])
		rand.Read(b)
		if _, err := f.WriteAt(b, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func TestNbdinfoList(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	names := []string{"one", "three", "two"}
	var exps []fileExport
	for i, n := range names {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, make([]byte, (i+1)<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		exps = append(exps, fileExport{name: n, path: p})
	}
	for _, s := range []*server{startOurs(t, exps...), startNbdkit(t, "file", "dir="+dir)} {
		out := run(t, "nbdinfo", "--list", "--json", s.uri(""))
		var doc struct {
			Exports []struct {
				Name string `json:"export-name"`
				Size int64  `json:"export-size"`
			} `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			t.Fatalf("%s: %v\n%s", s.kind, err, out)
		}
		var got []string
		sizes := map[string]int64{}
		for _, e := range doc.Exports {
			got = append(got, e.Name)
			sizes[e.Name] = e.Size
		}
		slices.Sort(got)
		if !slices.Equal(got, names) || sizes["one"] != 1<<20 || sizes["two"] != 3<<20 {
			t.Errorf("%s: nbdinfo --list: %v %v\n%s", s.kind, got, sizes, out)
		}
		// The plain text listing names them too.
		txt := run(t, "nbdinfo", "--list", s.uri(""))
		for _, n := range names {
			if !strings.Contains(txt, "export=\""+n+"\"") && !strings.Contains(txt, "export=\""+n) {
				t.Errorf("%s: nbdinfo --list lacks %q:\n%s", s.kind, n, txt)
			}
		}
	}
}

func TestNbdinfoJSON(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	src := sparseImage(t, 8<<20, [2]int64{0, 1 << 20})
	ro := filepath.Join(t.TempDir(), "ro.img")
	copyFile(t, src, ro)
	s := startOurs(t, fileExport{name: "rw", path: src}, fileExport{name: "ro", path: ro, readOnly: true})
	type info struct {
		Size        int64 `json:"export-size"`
		ReadOnly    bool  `json:"is_read_only"`
		CanFlush    bool  `json:"can_flush"`
		CanFUA      bool  `json:"can_fua"`
		CanTrim     bool  `json:"can_trim"`
		CanZero     bool  `json:"can_zero"`
		CanFastZero bool  `json:"can_fast_zero"`
		CanMulti    bool  `json:"can_multi_conn"`
		CanCache    bool  `json:"can_cache"`
		CanDF       bool  `json:"can_df"`
	}
	get := func(uri string) info {
		out := run(t, "nbdinfo", "--json", uri)
		var doc struct {
			Structured bool   `json:"structured"`
			Exports    []info `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Exports) != 1 || !doc.Structured {
			t.Fatalf("nbdinfo --json: %v\n%s", err, out)
		}
		return doc.Exports[0]
	}
	if got, want := get(s.uri("rw")), (info{Size: 8 << 20, CanFlush: true, CanFUA: true, CanTrim: true, CanZero: true,
		CanFastZero: true, CanMulti: true, CanCache: true, CanDF: true}); got != want {
		t.Errorf("rw: %+v\nwant %+v", got, want)
	}
	if got, want := get(s.uri("ro")), (info{Size: 8 << 20, ReadOnly: true, CanFlush: true, CanMulti: true,
		CanCache: true, CanDF: true}); got != want {
		t.Errorf("ro: %+v\nwant %+v", got, want)
	}
}

func TestNbdinfoMap(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	src := sparseImage(t, 8<<20, [2]int64{0, 1 << 20}, [2]int64{4 << 20, 5 << 20})
	both(t, src, func(t *testing.T, s *server, file string) {
		out := run(t, "nbdinfo", "--map", "--json", s.uri("disk"))
		var m []struct {
			Offset int64 `json:"offset"`
			Length int64 `json:"length"`
			Type   int   `json:"type"`
		}
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		// Coalesce and compare with the file's layout.
		type run struct {
			end  int64
			hole bool
		}
		var got []run
		for _, e := range m {
			h := e.Type&1 != 0
			if n := len(got); n > 0 && got[n-1].hole == h {
				got[n-1].end = e.Offset + e.Length
				continue
			}
			got = append(got, run{e.Offset + e.Length, h})
		}
		want := []run{{1 << 20, false}, {4 << 20, true}, {5 << 20, false}, {8 << 20, true}}
		if !slices.Equal(got, want) {
			t.Errorf("map %v, want %v\n%s", got, want, out)
		}
	})
}

func TestNbdcopy(t *testing.T) {
	testenv.RequireTool(t, "nbdcopy")
	src := sparseImage(t, 16<<20, [2]int64{0, 3 << 20}, [2]int64{9 << 20, 16 << 20})
	zero := filepath.Join(t.TempDir(), "zero.img")
	if err := os.WriteFile(zero, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(zero, 16<<20)
	both(t, zero, func(t *testing.T, s *server, file string) {
		run(t, "nbdcopy", src, s.uri("disk"))
		back := filepath.Join(t.TempDir(), "back.img")
		run(t, "nbdcopy", s.uri("disk"), back)
		run(t, "cmp", src, back)
		run(t, "cmp", src, file)
	})
}

func TestQemuIO(t *testing.T) {
	testenv.RequireTool(t, "qemu-io")
	src := sparseImage(t, 8<<20)
	both(t, src, func(t *testing.T, s *server, file string) {
		out := run(t, "qemu-io", "-f", "raw",
			"-c", "write -P 0x5a 0 1M",
			"-c", "write -P 0xa5 1M 64k",
			"-c", "read -P 0x5a 0 1M",
			"-c", "read -P 0xa5 1M 64k",
			"-c", "write -z 512k 64k",
			"-c", "read -P 0 512k 64k",
			"-c", "read -P 0x5a 0 512k",
			"-c", "discard 2M 1M",
			"-c", "flush",
			"-c", "read -P 0 3M 1M",
			s.uri("disk"))
		for _, bad := range []string{"failed", "error", "Error", "mismatch"} {
			if strings.Contains(out, bad) {
				t.Fatalf("qemu-io: %q in output:\n%s", bad, out)
			}
		}
		if n := strings.Count(out, "read "); n != 5 {
			t.Errorf("qemu-io did %d reads:\n%s", n, out)
		}
		// The file holds what qemu-io wrote.
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if b[0] != 0x5a || b[512<<10] != 0 || b[1<<20] != 0xa5 || b[(1<<20)+(64<<10)] != 0 {
			t.Errorf("file contents wrong after qemu-io")
		}
		// A pattern check that must fail does fail (the test can fail).
		cmd := exec.Command("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4k", s.uri("disk"))
		if out, _ := cmd.CombinedOutput(); !strings.Contains(string(out), "Pattern verification failed") {
			t.Errorf("qemu-io wrong pattern not detected:\n%s", out)
		}
	})
}

func TestQemuImgCompare(t *testing.T) {
	testenv.RequireTool(t, "qemu-img")
	src := sparseImage(t, 8<<20, [2]int64{1 << 20, 2 << 20})
	both(t, src, func(t *testing.T, s *server, file string) {
		out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("disk"))
		if !strings.Contains(out, "identical") {
			t.Errorf("qemu-img compare: %s", out)
		}
		// After a write through the server they differ.
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 4M 4k", s.uri("disk"))
		cmd := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("disk"))
		if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "mismatch") {
			t.Errorf("qemu-img compare after a write: %v %s", err, out)
		}
	})
}

func TestFioVerify(t *testing.T) {
	testenv.RequireTool(t, "fio")
	src := sparseImage(t, 32<<20)
	both(t, src, func(t *testing.T, s *server, file string) {
		out := run(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+s.uri("disk"),
			"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c",
			"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
		var doc struct {
			Jobs []struct {
				Error int `json:"error"`
				Write struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"write"`
				Read struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"read"`
			} `json:"jobs"`
		}
		if i := strings.IndexByte(out, '{'); i >= 0 {
			out = out[i:]
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Jobs) != 1 {
			t.Fatalf("fio output: %v\n%s", err, out)
		}
		j := doc.Jobs[0]
		if j.Error != 0 || j.Write.IOBytes != 32<<20 || j.Read.IOBytes != 32<<20 {
			t.Errorf("fio: error %d, wrote %d, verified %d", j.Error, j.Write.IOBytes, j.Read.IOBytes)
		}
	})
}

// dirtyBitmap is a MetaContext shaped like qemu's qemu:dirty-bitmap:NAME:
// fixed dirty ranges.
type dirtyBitmap struct {
	name  string
	size  int64
	dirty [][2]int64 // sorted [start, end)
}

func (d dirtyBitmap) Name() string { return "qemu:dirty-bitmap:" + d.name }

func (d dirtyBitmap) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	var out []nbdsrv.Extent
	pos := off
	end := min(off+length, d.size)
	for _, r := range d.dirty {
		if r[1] <= pos {
			continue
		}
		if r[0] >= end {
			break
		}
		if r[0] > pos {
			out = append(out, nbdsrv.Extent{Length: r[0] - pos})
			pos = r[0]
		}
		e := min(r[1], end)
		out = append(out, nbdsrv.Extent{Length: e - pos, Flags: nbdsrv.ExtentDirty})
		pos = e
	}
	if pos < end {
		out = append(out, nbdsrv.Extent{Length: end - pos})
	}
	return out, nil
}

func dirtyExport(t *testing.T) (*server, string) {
	src := sparseImage(t, 8<<20, [2]int64{0, 1 << 20})
	bm := dirtyBitmap{name: "snap1", size: 8 << 20, dirty: [][2]int64{{64 << 10, 128 << 10}, {4 << 20, 6 << 20}}}
	contexts := func() []nbdsrv.MetaContext { return []nbdsrv.MetaContext{bm} }
	return startOurs(t, fileExport{name: "disk", path: src, contexts: contexts}), src
}

func TestDirtyBitmapContext(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	s, _ := dirtyExport(t)
	out := run(t, "nbdinfo", "--map=qemu:dirty-bitmap:snap1", "--json", s.uri("disk"))
	var m []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var dirty [][2]int64
	for _, e := range m {
		if e.Type&1 != 0 {
			dirty = append(dirty, [2]int64{e.Offset, e.Offset + e.Length})
		}
	}
	if want := [][2]int64{{64 << 10, 128 << 10}, {4 << 20, 6 << 20}}; !slices.Equal(dirty, want) {
		t.Errorf("nbdinfo dirty map %v, want %v\n%s", dirty, want, out)
	}
	// nbdinfo lists the context.
	if info := run(t, "nbdinfo", "--json", s.uri("disk")); !strings.Contains(info, "qemu:dirty-bitmap:snap1") {
		t.Errorf("nbdinfo does not list the context:\n%s", info)
	}

	// qemu reads a dirty bitmap through x-dirty-bitmap, reporting dirty
	// ranges as "data": false (it maps the dirty bit onto NBD_STATE_HOLE).
	testenv.RequireTool(t, "qemu-img")
	opts := fmt.Sprintf("driver=nbd,server.type=unix,server.path=%s,export=disk,x-dirty-bitmap=qemu:dirty-bitmap:snap1", s.sock)
	out = run(t, "qemu-img", "map", "--output=json", "--image-opts", opts)
	var qm []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &qm); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	dirty = nil
	for _, e := range qm {
		if !e.Data {
			dirty = append(dirty, [2]int64{e.Start, e.Start + e.Length})
		}
	}
	if want := [][2]int64{{64 << 10, 128 << 10}, {4 << 20, 6 << 20}}; !slices.Equal(dirty, want) {
		t.Errorf("qemu-img map x-dirty-bitmap: dirty %v, want %v\n%s", dirty, want, out)
	}
}

// A python3-libnbd script (what nbdsh runs; /usr/bin/python3 because the
// python3 on PATH may not see the Debian module) checks structured replies, block status
// with REQ_ONE and the custom context, and structured read chunks.
func TestNbdshScript(t *testing.T) {
	testenv.RequireTool(t, "nbdsh") // the package that brings python3-libnbd along
	s, _ := dirtyExport(t)
	script := `
import json, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:snap1")
h.set_export_name("disk")
h.connect_uri(uri)
res = {"structured": h.get_structured_replies_negotiated(),
       "base": h.can_meta_context("base:allocation"),
       "dirty": h.can_meta_context("qemu:dirty-bitmap:snap1"),
       "df": h.can_df(), "size": h.get_size()}
ext = {}
def cb(ctx, off, entries, err):
    ext.setdefault(ctx, []).append(list(entries))
    return 0
h.block_status(8 << 20, 0, cb)
res["extents"] = ext
one = {}
def cb1(ctx, off, entries, err):
    one[ctx] = list(entries)
    return 0
h.block_status(8 << 20, 0, cb1, nbd.CMD_FLAG_REQ_ONE)
res["req_one"] = one
chunks = []
def chunk(buf, off, status, err):
    chunks.append([off, len(buf), status])
    return 0
buf = h.pread_structured(2 << 20, 0, chunk)
res["chunks"] = list(chunks)
res["data_ok"] = buf[:1 << 20] != bytes(1 << 20) and buf[1 << 20:] == bytes(1 << 20)
h.pread_structured(4096, 0, chunk, nbd.CMD_FLAG_DF)
res["df_chunks"] = len(chunks) - len(res["chunks"])
try:
    h.pread(4096, 8 << 20)
    res["past_end"] = "no error"
except nbd.Error as e:
    res["past_end"] = e.errnum
h.shutdown()
print(json.dumps(res))
`
	cmd := exec.Command("/usr/bin/python3", "-c", "uri = "+fmt.Sprintf("%q", s.uri("disk"))+"\n"+script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
	var res struct {
		Structured, Base, Dirty, DF, DataOK bool
		Size                                int64
		Extents                             map[string][][]int64
		ReqOne                              map[string][]int64 `json:"req_one"`
		Chunks                              [][]int64
		DFChunks                            int `json:"df_chunks"`
		PastEnd                             any `json:"past_end"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	res.DataOK = strings.Contains(string(out), `"data_ok": true`)
	if !res.Structured || !res.Base || !res.Dirty || !res.DF || res.Size != 8<<20 || !res.DataOK {
		t.Errorf("negotiation/data: %s", out)
	}
	// Block status: base:allocation says data then hole; the dirty bitmap
	// its two ranges (flattened entries are length, flags pairs).
	base := res.Extents["base:allocation"]
	if len(base) != 1 || len(base[0]) < 4 || base[0][0] != 1<<20 || base[0][1] != 0 || base[0][3]&1 == 0 {
		t.Errorf("base:allocation extents %v", base)
	}
	dirty := res.Extents["qemu:dirty-bitmap:snap1"]
	want := []int64{64 << 10, 0, 64 << 10, 1, 4<<20 - 128<<10, 0, 2 << 20, 1, 2 << 20, 0}
	if len(dirty) != 1 || !slices.Equal(dirty[0], want) {
		t.Errorf("dirty extents %v, want %v", dirty, want)
	}
	if r := res.ReqOne["qemu:dirty-bitmap:snap1"]; !slices.Equal(r, []int64{64 << 10, 0}) {
		t.Errorf("REQ_ONE dirty: %v", res.ReqOne)
	}
	if r := res.ReqOne["base:allocation"]; len(r) != 2 {
		t.Errorf("REQ_ONE base: %v", res.ReqOne)
	}
	// The 2 MiB read: one data chunk then... our server sends one chunk
	// per request, so a read over data and hole is one OFFSET_DATA
	// (status 1 = LIBNBD_READ_DATA).
	if len(res.Chunks) != 1 || res.Chunks[0][1] != 2<<20 || res.Chunks[0][2] != 1 {
		t.Errorf("read chunks %v", res.Chunks)
	}
	if res.DFChunks != 1 {
		t.Errorf("DF read in %d chunks", res.DFChunks)
	}
	if v, ok := res.PastEnd.(float64); !ok || int(v) != 22 {
		t.Errorf("read past the end: %v, want errno 22", res.PastEnd)
	}
}

func TestNbdfuseExt4(t *testing.T) {
	testenv.RequireRoot(t)
	nbdfuse := testenv.RequireTool(t, "nbdfuse")
	testenv.RequireTool(t, "mkfs.ext4")
	testenv.RequireTool(t, "fusermount3")
	dir := tempDir(t)
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 64<<20)
	run(t, "mkfs.ext4", "-q", "-F", img)
	s := startOurs(t, fileExport{name: "fs", path: img})

	fuseDir := filepath.Join(dir, "fuse")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(fuseDir, 0o755)
	os.Mkdir(mnt, 0o755)
	pidfile := filepath.Join(dir, "nbdfuse.pid")
	cmd := exec.Command(nbdfuse, "-P", pidfile, fuseDir+"/disk", "--unix", s.sock)
	cmd.Stderr = testWriter{t}
	// nbdfuse connects to the default export; ours is "fs".
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fuseDone := make(chan error, 1)
	go func() { fuseDone <- cmd.Wait() }()
	var unmountOnce sync.Once
	unmountFuse := func() {
		unmountOnce.Do(func() {
			exec.Command("fusermount3", "-u", fuseDir).Run()
			select {
			case <-fuseDone:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-fuseDone
			}
		})
	}
	ready := false
	for i := 0; i < 500 && !ready; i++ {
		if _, err := os.Stat(pidfile); err == nil {
			ready = true
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !ready {
		unmountFuse()
		t.Fatal("nbdfuse did not become ready")
	}
	defer unmountFuse()
	run(t, "mount", "-o", "loop", fuseDir+"/disk", mnt)
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	want := bytes.Repeat([]byte("nbdsnap over nbdfuse\n"), 50000)
	if err := os.WriteFile(filepath.Join(mnt, "hello.txt"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
	run(t, "umount", mnt)
	mounted = false
	run(t, "mount", "-o", "loop,ro", fuseDir+"/disk", mnt)
	mounted = true
	got, err := os.ReadFile(filepath.Join(mnt, "hello.txt"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("file read back through ext4 on nbdfuse: %v, equal=%v", err, bytes.Equal(got, want))
	}
	run(t, "umount", mnt)
	mounted = false
	unmountFuse()
	// The image the server wrote is a clean file system holding the file.
	out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput()
	if err != nil {
		t.Errorf("e2fsck: %v\n%s", err, out)
	}
	if n := s.srv.OpenConns("fs"); n != 0 {
		t.Errorf("connections still open after unmount: %d", n)
	}
}
