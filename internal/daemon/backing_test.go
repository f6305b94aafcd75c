package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// TestBackingSymlinks: a backing path that is a symbolic link to nothing
// is refused (a new store is only ever created as a new file); a store
// moved to another directory and linked back from its path reopens, its
// UUID proving it is the snapshot's; clear deletes no link and says so.
func TestBackingSymlinks(t *testing.T) {
	e := newEnv(t, 4<<20)
	ctx := context.Background()
	d := start(t, e.config())
	c := control.NewClient(e.ctl)

	dangling := filepath.Join(e.dir, "dangling.cow")
	if err := os.Symlink(filepath.Join(e.dir, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Create(ctx, control.CreateRequest{Name: "x", BackingPath: dangling}); !errors.Is(err, control.ErrExists) ||
		!strings.Contains(err.Error(), "symbolic link to nothing") {
		t.Fatalf("create over a dangling link: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "nowhere")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused create made the link's target: %v", err)
	}

	store := filepath.Join(e.dir, "s.cow")
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: store}); err != nil {
		t.Fatal(err)
	}
	frozen := bytes.Repeat([]byte{0}, 64<<10)
	if err := d.engine.WriteAt(ctx, bytes.Repeat([]byte{7}, 64<<10), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(t.TempDir(), "s.cow")
	if err := os.Rename(store, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(moved, store); err != nil {
		t.Fatal(err)
	}
	d = start(t, e.config())
	info, err := c.Snapshot(ctx, "s")
	if err != nil || info.State != control.StateValid || !info.Served {
		t.Fatalf("snapshot whose store was moved and linked back: %+v, %v", info, err)
	}
	snap, _ := d.engine.Snapshot("s")
	got := make([]byte, len(frozen))
	if err := snap.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, frozen) {
		t.Fatalf("read through the link: %v", err)
	}
	res, err := c.Clear(ctx, "s", false)
	if err != nil || !strings.Contains(res.Kept, "symbolic link") {
		t.Fatalf("clear of a linked store: %+v, %v", res, err)
	}
	if _, err := os.Lstat(store); err != nil {
		t.Fatalf("clear removed the user's link: %v", err)
	}
}

// TestRestartUpgradesVersion1Record: a record written before records
// carried a phase, a store UUID, an origin identity and a session (version
// 1) reopens its snapshot, recognised by name and origin ID, and is
// rewritten as version 2 with the store's UUID and the origin's identity.
func TestRestartUpgradesVersion1Record(t *testing.T) {
	e := newEnv(t, 4<<20)
	ctx := context.Background()
	d := start(t, e.config())
	c := control.NewClient(e.ctl)
	info, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow")})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	v1 := fmt.Sprintf(`{"version":1,"name":"s","backing_path":%q,"cluster_size":65536,"transient":false,"max_size":0,"created":%q}`,
		filepath.Join(e.dir, "s.cow"), info.Created.Format(time.RFC3339Nano))
	rec := filepath.Join(e.state, snapFile("s"))
	if err := os.WriteFile(rec, []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}

	d = start(t, e.config())
	got, err := c.Snapshot(ctx, "s")
	if err != nil || got.State != control.StateValid || !got.Served || got.UUID != info.UUID {
		t.Fatalf("snapshot with a version 1 record after a restart: %+v, %v", got, err)
	}
	r, err := d.state.read(snapFile("s"))
	if err != nil || r.Version != recordVersion || r.Phase != phaseReady || r.UUID != info.UUID ||
		r.Origin == nil || r.Origin.String() != d.ident.String() || r.Session != d.session {
		t.Fatalf("record after the restart: %+v, %v", r, err)
	}
}
