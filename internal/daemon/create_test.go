package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

func TestCreateStatusClear(t *testing.T) {
	e := newEnv(t, 4<<20)
	d := start(t, e.config())
	ctx := context.Background()
	c := control.NewClient(e.ctl)

	backing := filepath.Join(e.dir, "s1.cow")
	info, err := c.Create(ctx, control.CreateRequest{Name: "s1", BackingPath: backing, ClusterSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if info.State != control.StateValid || info.ClusterSize != 16<<10 || info.ClustersTotal != 256 ||
		!info.Persistent || !info.Served || info.Origin != "data" || info.UUID == "" || info.Created.IsZero() {
		t.Fatalf("create answered %+v", info)
	}
	if _, err := os.Stat(filepath.Join(e.state, "snap-s1.json")); err != nil {
		t.Fatalf("no state record: %v", err)
	}

	// Writes through the engine are copied for the snapshot.
	if err := d.engine.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil || len(st.Snapshots) != 1 || st.Snapshots[0].Stats.CowCalls == 0 {
		t.Fatalf("status %+v, %v", st, err)
	}
	// The status shows the held-writes budget: the default log size.
	if st.HeldWrites.BudgetBytes != DefaultHeldBytes || st.HeldWrites.Failed {
		t.Fatalf("status held_writes %+v, want the default budget", st.HeldWrites)
	}

	// An NBD client holding the snapshot export open makes clear refuse.
	conn := nbdConnect(t, e.sock, "unix", "s1")
	_, err = c.Clear(ctx, "s1", false)
	if !errors.Is(err, control.ErrBusy) || !strings.Contains(err.Error(), `snapshot "s1" is open by 1 NBD client(s)`) {
		t.Fatalf("clear while open: %v", err)
	}
	if _, err := os.Stat(backing); err != nil {
		t.Fatalf("refused clear removed the backing file: %v", err)
	}
	if _, err := c.Snapshot(ctx, "s1"); err != nil {
		t.Fatalf("refused clear dropped the snapshot: %v", err)
	}
	if _, err := c.Clear(ctx, "s1", true); err != nil {
		t.Fatalf("clear --force: %v", err)
	}
	conn.Close()
	for _, p := range []string{backing, filepath.Join(e.state, "snap-s1.json")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after clear: %v", p, err)
		}
	}
	if _, err := c.Snapshot(ctx, "s1"); !errors.Is(err, control.ErrNotFound) {
		t.Fatalf("after clear: %v", err)
	}
	if d.srv.OpenConns("s1") != 0 {
		t.Fatal("export still has connections")
	}
}

// Every refused create leaves the state directory, the backing directory
// and the set of exports exactly as they were.
func TestCreateRefusals(t *testing.T) {
	e := newEnv(t, 4<<20)
	start(t, e.config())
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	existing := filepath.Join(e.dir, "s0.cow")
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s0", BackingPath: existing}); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(e.dir, "other.file")
	os.WriteFile(other, []byte("keep me"), 0o600)

	type tc struct {
		name string
		req  control.CreateRequest
		want string
		is   error
	}
	tests := []tc{
		{"existing name", control.CreateRequest{Name: "s0", BackingPath: filepath.Join(e.dir, "x.cow")}, `snapshot "s0" already exists`, control.ErrExists},
		{"origin's name", control.CreateRequest{Name: "data", BackingPath: filepath.Join(e.dir, "x.cow")}, "is the origin export's name", control.ErrExists},
		{"backing exists", control.CreateRequest{Name: "s1", BackingPath: other}, "backing file " + other + " already exists", control.ErrExists},
		{"bad cluster size", control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "x.cow"), ClusterSize: 3000}, "cluster size 3000 is not a power of two", control.ErrInvalid},
		{"cluster size too big", control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "x.cow"), ClusterSize: 2 << 20}, "is not a power of two between", control.ErrInvalid},
		{"bad name", control.CreateRequest{Name: "../evil", BackingPath: filepath.Join(e.dir, "x.cow")}, "must be 1-64", control.ErrInvalid},
		{"relative backing", control.CreateRequest{Name: "s1", BackingPath: "x.cow"}, "is not absolute", control.ErrInvalid},
		{"backing dir missing", control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "nodir", "x.cow")}, "directory of backing path", control.ErrInvalid},
	}
	if os.Geteuid() == 0 {
		ro, full := t.TempDir(), t.TempDir()
		mountTmpfs(t, ro, "ro,size=1m")
		mountTmpfs(t, full, "size=64k")
		disktest.Fill(t, filepath.Join(full, "filler"))
		tests = append(tests,
			tc{"read-only filesystem", control.CreateRequest{Name: "s1", BackingPath: filepath.Join(ro, "s1.cow")},
				"backing path " + filepath.Join(ro, "s1.cow") + " is on a read-only filesystem", nil},
			tc{"full filesystem", control.CreateRequest{Name: "s1", BackingPath: filepath.Join(full, "s1.cow")},
				"no space for backing store " + filepath.Join(full, "s1.cow") + ": filesystem full", nil},
		)
	} else {
		testenv.RequireRoot(t) // skips (or fails under make test) after the cases above ran
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dirs := []string{e.dir, filepath.Dir(tt.req.BackingPath)}
			before := disktest.Record(t, dirs...)
			stBefore, _ := c.Status(ctx)
			_, err := c.Create(ctx, tt.req)
			if err == nil {
				t.Fatal("create succeeded")
			}
			if err.Error() != strings.TrimSpace(err.Error()) || strings.Contains(err.Error(), "\n") ||
				!strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q, want one line containing %q", err, tt.want)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("error %v is not %v", err, tt.is)
			}
			before.Unchanged(t, disktest.Record(t, dirs...))
			stAfter, _ := c.Status(ctx)
			if len(stAfter.Snapshots) != len(stBefore.Snapshots) {
				t.Fatalf("snapshots %d → %d", len(stBefore.Snapshots), len(stAfter.Snapshots))
			}
			// No export was added under the refused name.
			if tt.req.Name == "s1" {
				if _, err := c.Snapshot(ctx, "s1"); !errors.Is(err, control.ErrNotFound) {
					t.Fatalf("s1 exists after a refused create: %v", err)
				}
			}
		})
	}
}

func mountTmpfs(t *testing.T, dir, opts string) {
	t.Helper()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, opts); err != nil {
		t.Fatalf("mount tmpfs %s on %s: %v", opts, dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

func TestRestartReopens(t *testing.T) {
	e := newEnv(t, 4<<20)
	ctx := context.Background()
	d := start(t, e.config())
	c := control.NewClient(e.ctl)
	pattern := make([]byte, 64<<10)
	for i := range pattern {
		pattern[i] = byte(i * 7)
	}
	if err := d.engine.WriteAt(ctx, pattern, 0, false); err != nil {
		t.Fatal(err)
	}
	for _, r := range []control.CreateRequest{
		{Name: "keep", BackingPath: filepath.Join(e.dir, "keep.cow")},
		{Name: "temp", BackingPath: filepath.Join(e.dir, "temp.cow"), Transient: true},
	} {
		if _, err := c.Create(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.engine.WriteAt(ctx, make([]byte, 64<<10), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	d = start(t, e.config())
	st, err := c.Status(ctx)
	if err != nil || len(st.Snapshots) != 2 {
		t.Fatalf("status after restart: %+v, %v", st, err)
	}
	keep, temp := st.Snapshots[0], st.Snapshots[1]
	if keep.Name != "keep" || keep.State != control.StateValid || !keep.Served {
		t.Fatalf("persistent snapshot after restart: %+v", keep)
	}
	if temp.Name != "temp" || temp.State != control.StateInvalid || temp.Served || temp.ClusterSize != 64<<10 ||
		!strings.Contains(temp.Reason, "transient snapshot: it did not survive the daemon restart") {
		t.Fatalf("transient snapshot after restart: %+v", temp)
	}
	snap, ok := d.engine.Snapshot("keep")
	if !ok {
		t.Fatal("engine lacks the reopened snapshot")
	}
	got := make([]byte, len(pattern))
	if err := snap.ReadAt(ctx, got, 0); err != nil || string(got) != string(pattern) {
		t.Fatalf("reopened snapshot lost its data: %v", err)
	}
	if _, ok := d.engine.Snapshot("temp"); ok {
		t.Fatal("transient snapshot reopened")
	}
	// Clearing the gone one removes its record and store.
	if _, err := c.Clear(ctx, "temp", false); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(e.dir, "temp.cow"), filepath.Join(e.state, "snap-temp.json")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after clear: %v", p, err)
		}
	}
}

// Status may be asked at any time, also while snapshots come and go.
func TestStatusDuringCreateClear(t *testing.T) {
	e := newEnv(t, 4<<20)
	start(t, e.config())
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	stop := make(chan struct{})
	done := make(chan error)
	go func() {
		for {
			select {
			case <-stop:
				close(done)
				return
			default:
			}
			if _, err := c.Status(ctx); err != nil {
				done <- err
				return
			}
			c.Snapshot(ctx, "s")
		}
	}()
	for i := range 20 {
		backing := filepath.Join(e.dir, "s.cow")
		if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: backing, Transient: i%2 == 0}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Clear(ctx, "s", false); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestStateDirLeftoverTempFiles(t *testing.T) {
	e := newEnv(t, 1<<20)
	os.MkdirAll(e.state, 0o700)
	tmp := filepath.Join(e.state, ".snap-x.json.tmp123")
	os.WriteFile(tmp, []byte("{torn"), 0o600)
	start(t, e.config())
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("leftover temp file not removed: %v", err)
	}
}
