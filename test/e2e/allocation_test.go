package e2e

import (
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// base:allocation on the origin export and on snapshot exports: holes
// where the origin file has them (and, for a snapshot, had them at the
// create instant and nothing was copied since), as NBD clients see them.

// allocRun is one run of an allocation map: [start, end) and whether it
// is a hole.
type allocRun struct {
	start, end int64
	hole       bool
}

// joined merges neighbouring runs of one kind.
func joined(runs []allocRun) []allocRun {
	var out []allocRun
	for _, r := range runs {
		if n := len(out); n > 0 && out[n-1].hole == r.hole && out[n-1].end == r.start {
			out[n-1].end = r.end
			continue
		}
		out = append(out, r)
	}
	return out
}

// nbdinfoMap is `nbdinfo --map --json URI` (base:allocation), joined. A
// hole must be NBD_STATE_HOLE|NBD_STATE_ZERO, data 0: nothing else.
func nbdinfoMap(t *testing.T, uri string) []allocRun {
	t.Helper()
	testenv.RequireTool(t, "nbdinfo")
	out := run(t, "nbdinfo", "--map", "--json", uri)
	var m []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map --json %s: %v\n%s", uri, err, out)
	}
	var runs []allocRun
	for _, e := range m {
		if e.Type != 0 && e.Type != 3 {
			t.Errorf("nbdinfo --map %s: type %d at %d, want 0 (data) or 3 (hole, zero)", uri, e.Type, e.Offset)
		}
		runs = append(runs, allocRun{e.Offset, e.Offset + e.Length, e.Type == 3})
	}
	return joined(runs)
}

// qemuMap is `qemu-img map --output=json` of an export, joined: a hole is
// what qemu reports as neither data nor allocated (zero, not data).
func qemuMap(t *testing.T, uri string) []allocRun {
	t.Helper()
	testenv.RequireTool(t, "qemu-img")
	out := run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)
	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map %s: %v\n%s", uri, err, out)
	}
	var runs []allocRun
	for _, e := range m {
		runs = append(runs, allocRun{e.Start, e.Start + e.Length, !e.Data && e.Zero})
	}
	return joined(runs)
}

// layout is the map of size bytes with data in the given ranges.
func layout(size int64, data ...[2]int64) []allocRun {
	var runs []allocRun
	pos := int64(0)
	for _, r := range data {
		runs = append(runs, allocRun{pos, r[0], true}, allocRun{r[0], r[1], false})
		pos = r[1]
	}
	runs = append(runs, allocRun{pos, size, true})
	return joined(slices.DeleteFunc(runs, func(r allocRun) bool { return r.start == r.end }))
}

// TestAllocationSparse: a fully sparse 1 GiB origin is one hole, on the
// origin export and on a snapshot export, to nbdinfo and to qemu-img.
func TestAllocationSparse(t *testing.T) {
	e2e(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	run(t, "truncate", "-s", "1G", origin)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))
	want := []allocRun{{0, 1 << 30, true}}
	for _, export := range []string{"data", "s"} {
		if got := nbdinfoMap(t, d.uri(export)); !slices.Equal(got, want) {
			t.Errorf("nbdinfo --map %s: %v, want %v", export, got, want)
		}
		if got := qemuMap(t, d.uri(export)); !slices.Equal(got, want) {
			t.Errorf("qemu-img map %s: %v, want %v", export, got, want)
		}
	}
}

// TestAllocationHalfSparse: an origin of data and holes maps exactly, on
// both exports and to both tools; a copy of the snapshot made by nbdcopy
// without zero detection is as sparse as the origin (so the holes came
// from the map); after origin writes and trims the snapshot keeps its map,
// except the clusters the writes copied.
func TestAllocationHalfSparse(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "nbdcopy")
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	const size = 256 << 20
	// 1 MiB of random data every 2 MiB: half the origin.
	var data [][2]int64
	for off := int64(0); off < size; off += 2 << 20 {
		data = append(data, [2]int64{off, off + 1<<20})
	}
	writeSparse(t, origin, size, data)
	d := startDaemon(t, dir, origin)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"), "--cluster-size", "64K")
	want := layout(size, data...)
	for _, export := range []string{"data", "s"} {
		if got := nbdinfoMap(t, d.uri(export)); !slices.Equal(got, want) {
			t.Errorf("nbdinfo --map %s:\n got %v\nwant %v", export, got, want)
		}
		if got := qemuMap(t, d.uri(export)); !slices.Equal(got, want) {
			t.Errorf("qemu-img map %s:\n got %v\nwant %v", export, got, want)
		}
	}

	// Copies of the snapshot: nbdcopy with zero detection off (-S 0)
	// makes holes only where the map says so; qemu-img convert as users
	// run it. Both hold the origin's bytes, in about half the space.
	originBytes, err := os.ReadFile(origin)
	if err != nil {
		t.Fatal(err)
	}
	copies := map[string][]string{
		"nbdcopy":      {"nbdcopy", "-S", "0", d.uri("s"), filepath.Join(dir, "nbdcopy.img")},
		"qemu-img":     {"qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("s"), filepath.Join(dir, "qemu-img.img")},
		"nbdcopy-orig": {"nbdcopy", "-S", "0", d.uri("data"), filepath.Join(dir, "nbdcopy-orig.img")},
	}
	for name, cmd := range copies {
		run(t, cmd[0], cmd[1:]...)
		dst := cmd[len(cmd)-1]
		got, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, originBytes) {
			t.Errorf("%s: the copy differs from the origin", name)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(dst, &st); err != nil {
			t.Fatal(err)
		}
		if alloc := st.Blocks * 512; alloc < size/2 || alloc > size/2+size/16 {
			t.Errorf("%s: the copy of a half-sparse %d-byte export holds %d bytes, want about %d", name, size, alloc, size/2)
		}
	}

	// Origin changes after the create instant: the trim of the first data
	// MiB is a hole in the origin and data still in the snapshot; a 4 KiB
	// write into the first hole copies its 64 KiB cluster, data in the
	// snapshot from then on.
	run(t, "qemu-io", "-f", "raw", "-c", "discard 0 1M", "-c", "write -P 0x5a 1052672 4k", d.uri("data"))
	wantOrigin := layout(size, append([][2]int64{{1052672, 1052672 + 4096}}, data[1:]...)...)
	wantSnap := layout(size, append([][2]int64{{0, 1<<20 + 64<<10}}, data[1:]...)...)
	if got := nbdinfoMap(t, d.uri("data")); !slices.Equal(got, wantOrigin) {
		t.Errorf("origin after the changes:\n got %v\nwant %v", got[:min(4, len(got))], wantOrigin[:4])
	}
	if got := nbdinfoMap(t, d.uri("s")); !slices.Equal(got, wantSnap) {
		t.Errorf("snapshot after the changes:\n got %v\nwant %v", got[:min(4, len(got))], wantSnap[:4])
	}
	if got := readExport(t, d.uri("s")); !slices.Equal(got, originBytes) {
		t.Error("the snapshot no longer reads as the origin at the create instant")
	}
}

// writeSparse makes path a sparse file of size bytes with random data in
// the given ranges.
func writeSparse(t *testing.T, path string, size int64, data [][2]int64) {
	t.Helper()
	f, err := os.Create(path)
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
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
