package daemon

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// fill writes n bytes of value v at off through the engine (the origin
// export's path).
func fill(t *testing.T, d *Daemon, v byte, off, n int64) {
	t.Helper()
	p := make([]byte, n)
	for i := range p {
		p[i] = v
	}
	if err := d.engine.WriteAt(context.Background(), p, off, false); err != nil {
		t.Fatal(err)
	}
}

func ranges(rs ...int64) []control.Range {
	out := []control.Range{}
	for i := 0; i < len(rs); i += 2 {
		out = append(out, control.Range{Offset: rs[i], Length: rs[i+1]})
	}
	return out
}

func wantDiff(t *testing.T, c *control.Client, base, target string, want []control.Range) {
	t.Helper()
	got, err := c.Diff(context.Background(), base, target)
	if err != nil {
		t.Fatalf("diff %s %s: %v", base, target, err)
	}
	var total int64
	for _, r := range want {
		total += r.Length
	}
	if !slices.Equal(got.Ranges, want) || got.ChangedBytes != total || got.Granularity != 16<<10 {
		t.Fatalf("diff %s %s: %+v; want ranges %v", base, target, got, want)
	}
}

// contextNames lists the dirty-bitmap contexts an export offers now.
func contextNames(t *testing.T, d *Daemon, export string) []string {
	t.Helper()
	var mcs []nbdsrv.MetaContext
	if export == "data" {
		mcs = dirtyContexts(d.engine.Tracked(), d.engine.ChangedSince)
	} else {
		s, ok := d.engine.Snapshot(export)
		if !ok {
			t.Fatalf("no snapshot %q", export)
		}
		mcs = dirtyContexts(s.Bases(), s.Changed)
	}
	var out []string
	for _, mc := range mcs {
		out = append(out, mc.Name())
	}
	return out
}

// TestChangedBlocks drives changed-block tracking through the daemon:
// diffs between snapshots and against the origin, a bookmark that keeps
// counting after its image is gone, refusals that change nothing, and a
// restart that keeps all of it.
func TestChangedBlocks(t *testing.T) {
	e := newEnv(t, 4<<20)
	cfg := e.config()
	d := start(t, cfg)
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	const cs = 16 << 10
	create := func(name string, transient bool) {
		t.Helper()
		if _, err := c.Create(ctx, control.CreateRequest{Name: name, BackingPath: filepath.Join(e.dir, name+".cow"),
			ClusterSize: cs, Transient: transient}); err != nil {
			t.Fatal(err)
		}
	}

	create("s1", false)
	fill(t, d, 1, 100, 10)   // cluster 0
	fill(t, d, 2, 5*cs-1, 2) // clusters 4 and 5
	create("t", true)        // transient: never a base
	create("s2", false)      //
	fill(t, d, 3, 10*cs, cs) // cluster 10
	fill(t, d, 4, 100, 1)    // cluster 0 again
	wantDiff(t, c, "s1", "s2", ranges(0, cs, 4*cs, 2*cs))
	wantDiff(t, c, "s1", "", ranges(0, cs, 4*cs, 2*cs, 10*cs, cs))
	wantDiff(t, c, "s2", "data", ranges(0, cs, 10*cs, cs))
	if got := contextNames(t, d, "s2"); !slices.Equal(got, []string{"qemu:dirty-bitmap:s1"}) {
		t.Fatalf("s2's contexts: %v", got)
	}
	if got := contextNames(t, d, "data"); !slices.Equal(got, []string{"qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"}) {
		t.Fatalf("the origin's contexts: %v", got)
	}
	info, err := c.Snapshot(ctx, "s2")
	if err != nil || !slices.Equal(info.DiffBases, []string{"s1"}) || info.Granularity != cs || info.Generation != info.UUID || info.Bookmark {
		t.Fatalf("s2: %+v, %v", info, err)
	}

	// Refusals: each a clear error, nothing changed.
	for _, tc := range []struct{ base, target string }{
		{"s2", "s1"},   // newer than the target
		{"t", "s2"},    // transient
		{"nope", "s2"}, // missing
		{"s1", "t"},    // a transient target has no bases
		{"t", ""},      // the origin does not track a transient snapshot
	} {
		_, err := c.Diff(ctx, tc.base, tc.target)
		if !errors.Is(err, control.ErrInvalid) && !errors.Is(err, control.ErrNotFound) {
			t.Errorf("diff %s %s: %v; want a refusal", tc.base, tc.target, err)
		}
	}
	if _, err := c.Bookmark(ctx, "t", false); !errors.Is(err, control.ErrInvalid) {
		t.Errorf("bookmark of a transient snapshot: %v", err)
	}

	// Bookmark s1: its export goes, its data is freed, it keeps counting.
	conn := nbdConnect(t, e.sock, "unix", "s1")
	if _, err := c.Bookmark(ctx, "s1", false); !errors.Is(err, control.ErrBusy) {
		t.Fatalf("bookmark of an open snapshot: %v", err)
	}
	conn.Close()
	// The server counts the connection until it has read the close.
	for deadline := time.Now().Add(10 * time.Second); d.srv.OpenConns("s1") != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server still counts a closed connection to s1")
		}
	}
	before, _ := os.Stat(filepath.Join(e.dir, "s1.cow"))
	b, err := c.Bookmark(ctx, "s1", false)
	if err != nil || !b.Bookmark || b.Served || b.State != control.StateValid {
		t.Fatalf("bookmark: %+v, %v", b, err)
	}
	if _, err := c.Bookmark(ctx, "s1", false); !errors.Is(err, control.ErrInvalid) {
		t.Errorf("bookmark of a bookmark: %v", err)
	}
	if d.srv.OpenConns("s1") != 0 || exported(t, e.sock, "s1") {
		t.Fatal("a bookmark is still exported")
	}
	after, _ := os.Stat(filepath.Join(e.dir, "s1.cow"))
	if blocks(after) >= blocks(before) {
		t.Errorf("the bookmark's store holds %d blocks, the snapshot's %d", blocks(after), blocks(before))
	}
	fill(t, d, 5, 20*cs, 1) // cluster 20, after the bookmark
	create("s3", false)
	wantDiff(t, c, "s1", "s3", ranges(0, cs, 4*cs, 2*cs, 10*cs, cs, 20*cs, cs))
	wantDiff(t, c, "s2", "s3", ranges(0, cs, 10*cs, cs, 20*cs, cs))
	if _, err := c.Diff(ctx, "s3", "s1"); err == nil {
		t.Error("a bookmark answered as a diff target")
	}

	// A restart keeps the bookmark and every diff.
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	d = start(t, cfg)
	wantDiff(t, c, "s1", "s3", ranges(0, cs, 4*cs, 2*cs, 10*cs, cs, 20*cs, cs))
	wantDiff(t, c, "s1", "", ranges(0, cs, 4*cs, 2*cs, 10*cs, cs, 20*cs, cs))
	if b, err := c.Snapshot(ctx, "s1"); err != nil || !b.Bookmark || b.Served {
		t.Fatalf("bookmark after a restart: %+v, %v", b, err)
	}
	if exported(t, e.sock, "s1") {
		t.Fatal("a bookmark is exported after a restart")
	}

	// Clearing the bookmark takes it out of every list.
	if _, err := c.Clear(ctx, "s1", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "s1.cow")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the bookmark's store is still there: %v", err)
	}
	if got := contextNames(t, d, "s3"); !slices.Equal(got, []string{"qemu:dirty-bitmap:s2"}) {
		t.Fatalf("s3's contexts after clearing the bookmark: %v", got)
	}
	if info, _ := c.Snapshot(ctx, "s3"); !slices.Equal(info.DiffBases, []string{"s2"}) {
		t.Fatalf("s3's bases after clearing the bookmark: %v", info.DiffBases)
	}
}

// TestBookmarkRecordAhead: a record that says bookmark over a store that
// still holds its image (the header write was lost) is made a bookmark
// again at start, not served as a snapshot.
func TestBookmarkRecordAhead(t *testing.T) {
	e := newEnv(t, 1<<20)
	cfg := e.config()
	d := start(t, cfg)
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow")}); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(e.state, "snap-s.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatal(err)
	}
	rec["bookmark"] = true
	raw, _ = json.Marshal(rec)
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	d = start(t, cfg)
	info, err := c.Snapshot(ctx, "s")
	if err != nil || !info.Bookmark || info.Served || exported(t, e.sock, "s") {
		t.Fatalf("after start: %+v, %v", info, err)
	}
	if s, _ := d.engine.Snapshot("s"); !s.Info().Bookmark {
		t.Fatal("the store was not made a bookmark")
	}
}

func blocks(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Sys().(*syscall.Stat_t).Blocks
}

// exported reports whether the server at sock serves export name: it asks
// with NBD_OPT_EXPORT_NAME, which the server answers by closing the
// connection when there is no such export.
func exported(t *testing.T, sock, name string) bool {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(c, hello); err != nil {
		t.Fatalf("nbd hello: %v", err)
	}
	var out []byte
	out = binary.BigEndian.AppendUint32(out, uint32(binary.BigEndian.Uint16(hello[16:])&3))
	out = binary.BigEndian.AppendUint64(out, 0x49484156454F5054)
	out = binary.BigEndian.AppendUint32(out, 1) // NBD_OPT_EXPORT_NAME
	out = binary.BigEndian.AppendUint32(out, uint32(len(name)))
	out = append(out, name...)
	if _, err := c.Write(out); err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadFull(c, make([]byte, 10))
	return err == nil
}
