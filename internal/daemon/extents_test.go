package daemon

import (
	"context"
	"os"
	"slices"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// The adapters put cow's holes into NBD's terms: a hole is HOLE|ZERO (3),
// data 0, lengths unchanged, errors passed on.
func TestExtentAdapters(t *testing.T) {
	fs := vfstest.NewMemFS()
	origin, err := fs.OpenFile("origin", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := origin.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := origin.WriteAt([]byte{1}, 64<<10); err != nil {
		t.Fatal(err)
	}
	e, err := cow.NewEngine(origin, cow.EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx := context.Background()
	store, err := fs.OpenFile("store", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := e.Create(ctx, store, cow.SnapshotOptions{Name: "s", ClusterSize: 64 << 10, Transient: true})
	if err != nil {
		t.Fatal(err)
	}
	// A write into the first hole copies its cluster: data in the
	// snapshot, 4 KiB of data in the origin.
	if err := e.WriteAt(ctx, []byte{2}, 8192, false); err != nil {
		t.Fatal(err)
	}
	hole := nbdsrv.ExtentHole | nbdsrv.ExtentZero
	for _, tc := range []struct {
		name string
		b    nbdsrv.Extenter
		want []nbdsrv.Extent
	}{
		{"origin", originBackend{e}, []nbdsrv.Extent{{Length: 8 << 10, Flags: hole}, {Length: 4 << 10},
			{Length: 52 << 10, Flags: hole}, {Length: 4 << 10}, {Length: 1<<20 - 68<<10, Flags: hole}}},
		// The copied cluster is data, and so is the data after it.
		{"snapshot", snapshotBackend{snap}, []nbdsrv.Extent{{Length: 68 << 10}, {Length: 1<<20 - 68<<10, Flags: hole}}},
	} {
		got, err := tc.b.Extents(ctx, 0, 1<<20)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	if _, err := (originBackend{e}).Extents(ctx, 0, 2<<20); err == nil {
		t.Error("origin extents past the end: no error")
	}
}
