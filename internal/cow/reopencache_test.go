package cow

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestReopenCacheBytes: Reopen sizes the cache from ReopenOptions.CacheBytes
// exactly as Create does from SnapshotOptions.CacheBytes (the store does not
// record the budget, so a reopened snapshot gets whatever the owner asks
// now, not what it was created with), and refuses a negative budget. Kills:
// Reopen ignoring the option (every reopened snapshot would get the
// default cache).
func TestReopenCacheBytes(t *testing.T) {
	ctx := context.Background()
	const cs = 4096
	budgets := []int64{0, 1 << 20, 4 << 20} // 0: DefaultCacheBytes
	fs := vfstest.NewMemFS()
	e, origin, _ := testEngine(t, fs, 1<<20, 2, true)
	slots := map[int64]int{} // what Create gives for each budget
	for i, b := range budgets {
		name := fmt.Sprint("s", i)
		s, err := e.Create(ctx, mustOpen(t, fs, name), SnapshotOptions{Name: name, ClusterSize: cs, CacheBytes: b, OriginID: "o"})
		if err != nil {
			t.Fatal(err)
		}
		slots[b] = s.Info().CacheSlots
	}
	if slots[0] == slots[1<<20] || slots[1<<20] == slots[4<<20] {
		t.Fatalf("the budgets give the same cache sizes (%v): the test cannot tell them apart", slots)
	}
	if err := e.WriteAt(ctx, make([]byte, 3*cs), cs, false); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	e2, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	f, err := fs.OpenFile("s0", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "o", CacheBytes: -1}); !errors.Is(err, ErrBadOption) {
		t.Fatalf("Reopen with a negative cache budget: %v, want ErrBadOption", err)
	}
	// Each snapshot is reopened with another budget than it was created
	// with.
	for i := range budgets {
		name := fmt.Sprint("s", i)
		b := budgets[(i+1)%len(budgets)]
		f, err := fs.OpenFile(name, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		s, err := e2.Reopen(ctx, f, ReopenOptions{OriginID: "o", CacheBytes: b})
		if err != nil {
			t.Fatal(err)
		}
		if info := s.Info(); info.CacheSlots != slots[b] || info.ClustersCopied != 3 {
			t.Errorf("%s reopened with a budget of %d bytes: %d cache slots, %d clusters copied; want %d slots (as Create gives) and 3 clusters",
				name, b, info.CacheSlots, info.ClustersCopied, slots[b])
		}
	}
}
