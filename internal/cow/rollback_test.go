package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestRollbackBasic: a rollback shows the snapshot's image at once, keeps
// writes made during it, leaves another snapshot exact, completes, and
// resumes after a Close in the middle.
func TestRollbackBasic(t *testing.T) {
	ctx := context.Background()
	const size = 1<<20 + 4096
	fs := vfstest.NewMemFS()
	e, origin, data := testEngine(t, fs, size, 3, true)
	if _, err := e.Create(ctx, mustOpen(t, fs, "a"), SnapshotOptions{Name: "a", ClusterSize: 8192, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	imageA := bytes.Clone(data)
	model := bytes.Clone(data)
	rng := rand.New(rand.NewPCG(1, 2))
	write := func(off int64, n int) {
		t.Helper()
		p := make([]byte, n)
		fillRandom(rng, p)
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	for range 40 {
		write(rng.Int64N(size-20000), 1+rng.IntN(20000))
	}
	if _, err := e.Create(ctx, mustOpen(t, fs, "b"), SnapshotOptions{Name: "b", ClusterSize: 4096, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	imageB := bytes.Clone(model)
	for range 40 {
		write(rng.Int64N(size-20000), 1+rng.IntN(20000))
	}

	if err := e.Rollback(ctx, "a", mustOpen(t, fs, "progress"), RollbackOptions{Rate: 512 << 10}); err != nil {
		t.Fatal(err)
	}
	copy(model, imageA)
	img := make([]byte, size)
	wantImage(t, ctx, e.ReadAt, img, model, "origin right after the rollback instant", false)
	if _, err := e.Create(ctx, mustOpen(t, fs, "c"), SnapshotOptions{Name: "c", OriginID: "o"}); !errors.Is(err, ErrRollback) {
		t.Errorf("create during a rollback: %v", err)
	}
	if err := e.Clear("a"); !errors.Is(err, ErrRollback) {
		t.Errorf("clear of the rollback's snapshot: %v", err)
	}
	for range 20 {
		write(rng.Int64N(size-20000), 1+rng.IntN(20000))
	}
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	ri, ok := e.RollbackInfo()
	if !ok || ri.State != RollbackRunning || ri.RemainingBytes >= ri.TotalBytes || ri.Unsynced {
		t.Errorf("rollback info mid-way: %+v", ri)
	}
	wantImage(t, ctx, e.ReadAt, img, model, "origin during the rollback", false)

	// Close mid-way and resume.
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	e = e2
	for _, name := range []string{"a", "b"} {
		f, _ := fs.OpenFile(name, os.O_RDWR, 0)
		if _, err := e.Reopen(ctx, f, ReopenOptions{OriginID: "o"}); err != nil {
			t.Fatal(err)
		}
	}
	pf, _ := fs.OpenFile("progress", os.O_RDWR, 0)
	prog, err := backstore.OpenProgress(pf)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.ResumeRollback(prog); err != nil {
		t.Fatal(err)
	}
	wantImage(t, ctx, e.ReadAt, img, model, "origin after the resume", false)
	select {
	case <-e.RollbackDone():
	case <-time.After(30 * time.Second):
		t.Fatal("rollback did not end")
	}
	if ri, _ := e.RollbackInfo(); ri.State != RollbackComplete || ri.RemainingBytes != 0 {
		t.Fatalf("rollback info at the end: %+v", ri)
	}
	if err := e.EndRollback(); err != nil {
		t.Fatal(err)
	}
	phys := make([]byte, size)
	if err := readFull(origin, phys, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(phys, model) {
		i := firstDiff(phys, model)
		t.Errorf("origin file differs from the model at %d", i)
	}
	a, _ := e.Snapshot("a")
	b, _ := e.Snapshot("b")
	wantImage(t, ctx, a.ReadAt, img, imageA, "snapshot a after the rollback", true)
	wantImage(t, ctx, b.ReadAt, img, imageB, "snapshot b after the rollback", true)
	if _, err := e.Create(ctx, mustOpen(t, fs, "c"), SnapshotOptions{Name: "c", OriginID: "o"}); err != nil {
		t.Errorf("create after the rollback: %v", err)
	}
}
