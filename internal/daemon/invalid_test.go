package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// TestRestartKeepsInvalid: a persistent snapshot turns invalid (its store
// hits --max-size) and the write of its store's header is lost: the header
// is put back as it was before the invalidation, while the daemon is down,
// as if that write had failed and the daemon crashed. The origin moved on
// without copying for the snapshot, so the restarted daemon must not serve
// it: its state record says invalid, with the reason.
func TestRestartKeepsInvalid(t *testing.T) {
	e := newEnv(t, 4<<20)
	ctx := context.Background()
	d := start(t, e.config())
	c := control.NewClient(e.ctl)
	backing := filepath.Join(e.dir, "s.cow")
	const cs = 64 << 10
	// Data starts at 64 KiB (header slots, one metadata block, rounded
	// up to a cluster): room for two clusters.
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: backing, ClusterSize: cs, MaxSize: 3 * cs}); err != nil {
		t.Fatal(err)
	}
	headerSlots := make([]byte, 8192)
	readAt(t, backing, headerSlots, 0)

	p := make([]byte, cs)
	for i := range 4 {
		if err := d.engine.WriteAt(ctx, p, int64(i)*cs, false); err != nil {
			t.Fatalf("origin write %d: %v", i, err)
		}
	}
	// The writes were answered while held for their commit; the flush
	// returns once they reached the origin, which is after the
	// invalidation was recorded.
	if err := d.engine.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	before, err := c.Snapshot(ctx, "s")
	if err != nil || before.State != control.StateInvalid || before.Reason == "" {
		t.Fatalf("snapshot after overflowing its store: %+v, %v", before, err)
	}
	rec, err := d.state.read(snapFile("s"))
	if err != nil || !rec.Invalid || rec.Reason != before.Reason {
		t.Fatalf("state record %+v, %v; want invalid for %q", rec, err, before.Reason)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	// Lose the header write: the store reopens as valid on its own.
	writeAt(t, backing, headerSlots, 0)
	if h := storeHeader(t, backing); h.State != backstore.StateValid {
		t.Fatalf("store header state %v after putting the old header back", h.State)
	}

	d = start(t, e.config())
	after, err := c.Snapshot(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if after.State != control.StateInvalid || after.Reason != before.Reason || after.Served || !after.Persistent {
		t.Fatalf("snapshot after restart: %+v; want invalid for %q, not served", after, before.Reason)
	}
	if _, ok := d.engine.Snapshot("s"); ok {
		t.Fatal("the invalid snapshot was reopened")
	}
	if err := d.srv.RemoveExport("s", false); !errors.Is(err, nbdsrv.ErrNoExport) {
		t.Fatalf("the invalid snapshot is exported (removing the export: %v)", err)
	}
	st, err := c.Status(ctx)
	if err != nil || len(st.Snapshots) != 1 || st.Snapshots[0].State != control.StateInvalid || st.Snapshots[0].Reason != before.Reason {
		t.Fatalf("status after restart: %+v, %v", st, err)
	}

	if _, err := c.Clear(ctx, "s", false); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{backing, filepath.Join(e.state, snapFile("s"))} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after clear: %v", p, err)
		}
	}
}

// TestStateRecordInvalid: the invalid mark of a state record, and records
// written before it existed.
func TestStateRecordInvalid(t *testing.T) {
	dir := t.TempDir()
	s, _, err := openState(dir, "/dev/x", false)
	if err != nil {
		t.Fatal(err)
	}
	old := `{"version":1,"name":"snap1","backing_path":"/var/lib/nbdsnap/snap1.cow",
	 "cluster_size":65536,"transient":false,"max_size":0,"created":"2026-01-02T03:04:05Z"}`
	if err := os.WriteFile(filepath.Join(dir, snapFile("snap1")), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	check := func(step string, invalid bool, reason string) {
		t.Helper()
		recs, err := s.records()
		if err != nil || len(recs) != 1 || recs[0].damaged != nil || recs[0].rec.Invalid != invalid || recs[0].rec.Reason != reason ||
			recs[0].rec.BackingPath != "/var/lib/nbdsnap/snap1.cow" || recs[0].rec.Phase != phaseReady {
			t.Fatalf("%s: records %+v, %v; want invalid=%v reason %q", step, recs, err, invalid, reason)
		}
	}
	check("old record", false, "")
	if err := s.markInvalid("snap1", "store full"); err != nil {
		t.Fatal(err)
	}
	check("marked", true, "store full")
	if b, _ := os.ReadFile(filepath.Join(dir, snapFile("snap1"))); !strings.Contains(string(b), `"invalid": true`) {
		t.Fatalf("record on disk:\n%s", b)
	}
	if err := s.markInvalid("snap1", "later"); err != nil {
		t.Fatal(err)
	}
	check("marked twice", true, "store full")
	recs, _ := s.records()
	r := recs[0].rec
	r.Invalid, r.Reason, r.ClusterSize = false, "", 1<<20
	if err := s.put(r); err != nil {
		t.Fatal(err)
	}
	check("put over the mark", true, "store full")
	if err := s.remove("snap1"); err != nil {
		t.Fatal(err)
	}
	if err := s.markInvalid("snap1", "gone"); err == nil {
		t.Fatal("markInvalid of a removed record succeeded")
	}
	if recs, err := s.records(); err != nil || len(recs) != 0 {
		t.Fatalf("markInvalid brought back a removed record: %+v, %v", recs, err)
	}
}

func readAt(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func writeAt(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

// storeHeader reads a store's header the way a reopen does.
func storeHeader(t *testing.T, path string) backstore.Header {
	t.Helper()
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := backstore.Open(f, nil)
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	defer s.Close()
	return s.Header()
}

// FuzzStateRecord: whatever bytes a snap-*.json holds (a torn disk, a
// hand edit, another program's file), reading it gives a record that keeps
// the invariants the restart relies on, or an error that lists the snapshot
// as damaged; never a panic, and never an error from records() itself.
func FuzzStateRecord(f *testing.F) {
	f.Add([]byte(`{"version":2,"name":"x","phase":"ready","uuid":"5b1e7c3a-1f2e-4d5c-8b9a-0a1b2c3d4e5f","backing_path":"/b/x.cow","cluster_size":65536,"created":"2026-11-24T00:00:00Z","origin":{"kind":"file","size":1,"keys":{"ino":"1"}},"session":3}`))
	f.Add([]byte(`{"version":1,"name":"x","backing_path":"/b/x.cow","cluster_size":65536,"transient":false,"max_size":0,"created":"2026-01-02T03:04:05Z"}`))
	f.Add([]byte(`{"version":99}`))
	f.Add([]byte(``))
	dir := f.TempDir()
	s := &stateDir{dir: dir}
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, snapFile("x")), b, 0o600); err != nil {
			t.Fatal(err)
		}
		r, err := s.read(snapFile("x"))
		if err == nil {
			switch {
			case r.Name != "x", !filepath.IsAbs(r.BackingPath):
				t.Fatalf("record accepted with name %q, backing path %q", r.Name, r.BackingPath)
			case r.Phase != phaseCreating && r.Phase != phaseReady && r.Phase != phaseClearing:
				t.Fatalf("record accepted with phase %q", r.Phase)
			case r.UUID != "" && r.storeUUID() == (uuid.UUID{}):
				t.Fatalf("record accepted with store UUID %q", r.UUID)
			case r.Version < 1 || r.Version > recordVersion:
				t.Fatalf("record accepted with version %d", r.Version)
			}
		}
		loads, err := s.records()
		if err != nil || len(loads) != 1 || (loads[0].damaged == nil) != (err == nil && loads[0].rec.Name == "x") {
			t.Fatalf("records() = %+v, %v", loads, err)
		}
	})
}
