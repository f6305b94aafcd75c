package cow

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestClusterSizeRule: the cluster size is raised until the origin has at
// most 2^24 clusters; over 16 TiB no size will do.
func TestClusterSizeRule(t *testing.T) {
	const gib, tib = int64(1) << 30, int64(1) << 40
	tests := []struct {
		size int64
		req  int
		want int
	}{
		{64 * gib, 4096, 4096},
		{64*gib + 1, 4096, 8192},
		{tib, 4096, 64 << 10},
		{tib, 0, 64 << 10},
		{tib + 1, 0, 128 << 10},
		{16 * tib, 0, 1 << 20},
		{1 << 20, 1 << 20, 1 << 20},
	}
	for _, tt := range tests {
		if got, err := ClusterSize(tt.size, tt.req); err != nil || got != tt.want {
			t.Errorf("ClusterSize(%d, %d) = %d, %v; want %d", tt.size, tt.req, got, err, tt.want)
		}
	}
	_, err := ClusterSize(17*tib, 0)
	want := "cow: the origin is 18691697672192 bytes, over 16 TiB (17592186044416 bytes), the largest a snapshot can cover (16777216 clusters of at most 1 MiB)"
	if !errors.Is(err, ErrBadOption) || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("17 TiB: %v, want %q", err, want)
	}
}

// TestReopenResizedOrigin: a store reopened over its origin grown since
// says that the size changed, from what to what.
func TestReopenResizedOrigin(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	e, origin, _ := testEngine(t, fs, 64<<10, 1, true)
	if _, err := e.Create(ctx, mustOpen(t, fs, "p"), SnapshotOptions{Name: "p", ClusterSize: 8192, OriginID: "o1"}); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := origin.Truncate(128 << 10); err != nil {
		t.Fatal(err)
	}
	e2, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	f, _ := fs.OpenFile("p", os.O_RDWR, 0)
	_, err = e2.Reopen(ctx, f, ReopenOptions{OriginID: "o1"})
	want := `cow: reopen "p": the origin's size changed from 65536 to 131072 bytes since the snapshot was taken: a snapshot cannot follow a resized origin`
	if !errors.Is(err, ErrOriginResized) || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}
}
