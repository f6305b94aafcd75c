package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// trapFile wraps a file: reads that overlap a failing range fail with EIO,
// reads that overlap the held range wait until release is closed (held is
// closed when the first one arrives), and reads are recorded while
// recording is on; writes and syncs fail with EIO while readOnly is set.
type trapFile struct {
	vfs.File
	mu        sync.Mutex
	readOnly  bool
	fail      [][2]int64 // offset, length
	hold      [2]int64
	release   chan struct{}
	held      chan struct{}
	recording bool
	rec       [][2]int64
}

func overlaps(r [2]int64, off, n int64) bool { return off < r[0]+r[1] && r[0] < off+n }

func (f *trapFile) ReadAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	f.mu.Lock()
	if f.recording {
		f.rec = append(f.rec, [2]int64{off, n})
	}
	failing := false
	for _, r := range f.fail {
		failing = failing || overlaps(r, off, n)
	}
	var wait chan struct{}
	if f.hold[1] > 0 && overlaps(f.hold, off, n) {
		wait = f.release
		select {
		case <-f.held:
		default:
			close(f.held)
		}
	}
	f.mu.Unlock()
	if wait != nil {
		<-wait
	}
	if failing {
		return 0, &os.PathError{Op: "read", Path: "trap", Err: syscall.EIO}
	}
	return f.File.ReadAt(p, off)
}

func (f *trapFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	ro := f.readOnly
	f.mu.Unlock()
	if ro {
		return 0, &os.PathError{Op: "write", Path: "trap", Err: syscall.EIO}
	}
	return f.File.WriteAt(p, off)
}

func (f *trapFile) Sync() error {
	f.mu.Lock()
	ro := f.readOnly
	f.mu.Unlock()
	if ro {
		return &os.PathError{Op: "fdatasync", Path: "trap", Err: syscall.EIO}
	}
	return f.File.Sync()
}

// failReads makes reads of r fail from now on.
func (f *trapFile) failReads(r [2]int64) {
	f.mu.Lock()
	f.fail = append(f.fail, r)
	f.mu.Unlock()
}

// holdReads makes reads of r wait from now on, until release is called;
// held is closed when the first one arrives.
func (f *trapFile) holdReads(r [2]int64) (held <-chan struct{}, release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold, f.held, f.release = r, make(chan struct{}), make(chan struct{})
	return f.held, sync.OnceFunc(func() { close(f.release) })
}

// slotOf returns the range of the store file that a read of snapshot s's
// cluster c reads (its data slot); s must have committed c.
func (f *trapFile) slotOf(t *testing.T, s *Snapshot, c uint32) [2]int64 {
	t.Helper()
	f.mu.Lock()
	f.rec, f.recording = nil, true
	f.mu.Unlock()
	buf := make([]byte, s.geo.clusterLen(c))
	err := s.ReadAt(context.Background(), buf, s.geo.off(c))
	f.mu.Lock()
	rec := f.rec
	f.recording = false
	f.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(rec) != 1 {
		t.Fatalf("a read of cluster %d of %s read the store %d times (%v), want once", c, s.name, len(rec), rec)
	}
	return rec[0]
}

// rbFaults is the setup of a rollback fault test: an origin behind a
// FaultFS, snapshot "a" (8 KiB clusters, its store behind a trapFile) that
// copied most of the origin, then snapshot "b" (4 KiB clusters), with
// writes after each.
type rbFaults struct {
	fs             *vfstest.MemFS
	ffs            *vfstest.FaultFS
	origin         vfs.File
	e              *Engine
	a, b           *Snapshot
	trap           *trapFile
	rng            *rand.Rand
	model          []byte
	imageA, imageB []byte
}

const rbFaultSize = 256<<10 + 512

func newRBFaults(t *testing.T, seed uint64) *rbFaults {
	t.Helper()
	ctx := context.Background()
	w := &rbFaults{fs: vfstest.NewMemFS(), rng: rand.New(rand.NewPCG(seed, 61))}
	base := mustOpen(t, w.fs, "origin")
	w.model = make([]byte, rbFaultSize)
	fillRandom(w.rng, w.model)
	if _, err := base.WriteAt(w.model, 0); err != nil {
		t.Fatal(err)
	}
	if err := base.Sync(); err != nil {
		t.Fatal(err)
	}
	w.ffs = vfstest.NewFaultFS(w.fs)
	var err error
	if w.origin, err = w.ffs.OpenFile("origin", os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	if w.e, err = NewEngine(w.origin, EngineOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.e.Close() })
	w.trap = &trapFile{File: mustOpen(t, w.fs, "a")}
	if w.a, err = w.e.Create(ctx, w.trap, SnapshotOptions{Name: "a", ClusterSize: 8192, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	w.imageA = bytes.Clone(w.model)
	for range 30 {
		w.mustWrite(t, 24<<10)
	}
	if w.b, err = w.e.Create(ctx, mustOpen(t, w.fs, "b"), SnapshotOptions{Name: "b", ClusterSize: 4096, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	w.imageB = bytes.Clone(w.model)
	for range 20 {
		w.mustWrite(t, 24<<10)
	}
	if err := w.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *rbFaults) randRange(max int64) (int64, int64) {
	n := 1 + w.rng.Int64N(max)
	return w.rng.Int64N(rbFaultSize - n + 1), n
}

// write writes random bytes; the model follows if it succeeds.
func (w *rbFaults) write(off, n int64) error {
	p := make([]byte, n)
	fillRandom(w.rng, p)
	err := w.e.WriteAt(context.Background(), p, off, w.rng.IntN(4) == 0)
	if err == nil {
		copy(w.model[off:], p)
	}
	return err
}

// mustWrite writes at most max random bytes at a random offset.
func (w *rbFaults) mustWrite(t *testing.T, max int64) {
	t.Helper()
	if err := w.write(w.randRange(max)); err != nil {
		t.Fatal(err)
	}
}

// todo lists the clusters a copied: those a rollback to it restores.
func (w *rbFaults) todo() []uint32 {
	var out []uint32
	for c := range w.a.geo.count {
		if w.a.cache.copied.get(c) {
			out = append(out, c)
		}
	}
	return out
}

func (w *rbFaults) clusterRange(c uint32) (int64, int64) {
	return w.a.geo.off(c), int64(w.a.geo.clusterLen(c))
}

func waitRollback(t *testing.T, e *Engine) RollbackInfo {
	t.Helper()
	select {
	case <-e.RollbackDone():
	case <-time.After(20 * time.Second):
		t.Fatal("the rollback did not end")
	}
	ri, ok := e.RollbackInfo()
	if !ok {
		t.Fatal("no rollback info")
	}
	return ri
}

// restart closes w's engine and opens a new one on the origin file, with
// the snapshots reopened from their plain store files and the rollback
// resumed; it returns how many clusters the progress file left to restore,
// and the resumed rollback's total.
func (w *rbFaults) restart(t *testing.T) (left uint32, total int64) {
	t.Helper()
	ctx := context.Background()
	if err := w.e.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	origin, err := w.fs.OpenFile("origin", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if w.e, err = NewEngine(origin, EngineOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []**Snapshot{&w.a, &w.b} {
		f, err := w.fs.OpenFile((*s).name, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if *s, err = w.e.Reopen(ctx, f, ReopenOptions{OriginID: "o"}); err != nil {
			t.Fatal(err)
		}
	}
	pf, err := w.fs.OpenFile("progress", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := backstore.OpenProgress(pf)
	if err != nil {
		t.Fatalf("open progress: %v", err)
	}
	left = prog.Info().Entries - prog.Done()
	if err := w.e.ResumeRollback(prog); err != nil {
		t.Fatalf("resume: %v", err)
	}
	ri, _ := w.e.RollbackInfo()
	return left, ri.TotalBytes
}

// finish waits for w's rollback to complete, ends it, and checks the
// origin file and both snapshots.
func (w *rbFaults) finish(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if ri := waitRollback(t, w.e); ri.State != RollbackComplete || ri.RemainingBytes != 0 || ri.Err != "" {
		t.Fatalf("rollback ended as %+v", ri)
	}
	if err := w.e.EndRollback(); err != nil {
		t.Fatal(err)
	}
	phys, err := w.fs.Contents("origin")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(phys, w.model) {
		t.Fatalf("the origin file differs from the model at %d", firstDiff(phys, w.model))
	}
	img := make([]byte, rbFaultSize)
	wantImage(t, ctx, w.a.ReadAt, img, w.imageA, "snapshot a", true)
	wantImage(t, ctx, w.b.ReadAt, img, w.imageB, "snapshot b", true)
}

// TestRollbackSourceReadError: two clusters of the rollback's snapshot
// cannot be read from its store (EIO). The copier restores every other
// cluster and the rollback ends failed, saying why; the origin's reads of
// those two clusters, and writes to them, fail with EIO, the rest of the
// origin is the snapshot's image and takes writes, the other snapshot is
// exact, and the rollback cannot be ended nor snapshots created. Once the
// store reads again, a restart resumes the rollback, which completes.
func TestRollbackSourceReadError(t *testing.T) {
	ctx := context.Background()
	w := newRBFaults(t, 1)
	todo := w.todo()
	bad := []uint32{todo[len(todo)/3], todo[2*len(todo)/3]}
	var badBytes int64
	for _, c := range bad {
		w.trap.failReads(w.trap.slotOf(t, w.a, c))
		_, n := w.clusterRange(c)
		badBytes += n
	}
	if err := w.a.ReadAt(ctx, make([]byte, 10), w.a.geo.off(bad[0])); !errors.Is(err, syscall.EIO) {
		t.Fatalf("the trap does not bite: snapshot read %v", err)
	}
	if err := w.e.Rollback(ctx, "a", mustOpen(t, w.fs, "progress"), RollbackOptions{}); err != nil {
		t.Fatal(err)
	}
	copy(w.model, w.imageA)
	ri := waitRollback(t, w.e)
	if ri.State != RollbackFailed || !strings.Contains(ri.Err, "2 clusters could not be restored") ||
		!strings.Contains(ri.Err, syscall.EIO.Error()) || ri.RemainingBytes != badBytes {
		t.Fatalf("rollback with two unreadable clusters ended as %+v; want failed, %d bytes remaining, the error said", ri, badBytes)
	}
	isBad := func(off, n int64) bool {
		first, last := w.a.geo.span(off, n)
		return slices.ContainsFunc(bad, func(c uint32) bool { return c >= first && c <= last })
	}
	checkOrigin := func(when string) {
		t.Helper()
		buf := make([]byte, w.a.geo.csize)
		for c := range w.a.geo.count {
			off, n := w.clusterRange(c)
			err := w.e.ReadAt(ctx, buf[:n], off)
			switch {
			case slices.Contains(bad, c):
				if !errors.Is(err, syscall.EIO) {
					t.Fatalf("%s: read of cluster %d, unreadable in the snapshot's store: %v, want EIO", when, c, err)
				}
			case err != nil:
				t.Fatalf("%s: read of cluster %d: %v", when, c, err)
			case !bytes.Equal(buf[:n], w.model[off:off+n]):
				t.Fatalf("%s: cluster %d differs from the model at +%d", when, c, firstDiff(buf[:n], w.model[off:off+n]))
			}
		}
		off := w.a.geo.off(bad[0]) - 100
		if err := w.e.ReadAt(ctx, make([]byte, 3*w.a.geo.csize), off); !errors.Is(err, syscall.EIO) {
			t.Fatalf("%s: read across an unreadable cluster: %v, want EIO", when, err)
		}
	}
	checkOrigin("after the failed rollback")

	// Writes elsewhere work; to the unreadable clusters they fail with EIO
	// and change nothing.
	for writes := 0; writes < 20; {
		off, n := w.randRange(20 << 10)
		if isBad(off, n) {
			continue
		}
		if err := w.write(off, n); err != nil {
			t.Fatal(err)
		}
		writes++
	}
	off0, _ := w.clusterRange(bad[0])
	off1, _ := w.clusterRange(bad[1])
	for i, err := range []error{
		w.e.WriteAt(ctx, make([]byte, 100), off0+100, true),
		w.e.WriteAt(ctx, make([]byte, 3*w.a.geo.csize), off1-int64(w.a.geo.csize)-10, false),
		w.e.Trim(ctx, off1, 10, false),
		w.e.Zero(ctx, off0-10, 20, false),
	} {
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("request %d to an unreadable cluster: %v, want EIO", i, err)
		}
	}
	checkOrigin("after writes")
	if err := w.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	phys, _ := w.fs.Contents("origin")
	for c := range w.a.geo.count {
		off, n := w.clusterRange(c)
		if !slices.Contains(bad, c) && !bytes.Equal(phys[off:off+n], w.model[off:off+n]) {
			t.Fatalf("origin file: restored cluster %d differs from the model", c)
		}
	}
	img := make([]byte, rbFaultSize)
	wantImage(t, ctx, w.b.ReadAt, img, w.imageB, "snapshot b", true)
	for c := range w.a.geo.count {
		off, n := w.clusterRange(c)
		if slices.Contains(bad, c) {
			continue
		}
		if err := w.a.ReadAt(ctx, img[:n], off); err != nil || !bytes.Equal(img[:n], w.imageA[off:off+n]) {
			t.Fatalf("snapshot a, cluster %d: %v, or it differs from its image", c, err)
		}
	}
	if err := w.e.EndRollback(); !errors.Is(err, ErrRollback) {
		t.Fatalf("end of a failed rollback: %v, want ErrRollback", err)
	}
	if _, err := w.e.Create(ctx, mustOpen(t, w.fs, "c"), SnapshotOptions{Name: "c", OriginID: "o"}); !errors.Is(err, ErrRollback) {
		t.Fatalf("create during a failed rollback: %v, want ErrRollback", err)
	}

	// The store reads again: a restart resumes with the two clusters left.
	var todoBytes int64
	for _, c := range todo {
		_, n := w.clusterRange(c)
		todoBytes += n
	}
	if left, total := w.restart(t); left != 2 || total != todoBytes {
		t.Fatalf("resumed rollback of %d bytes with %d clusters left, want %d bytes and 2 clusters", total, left, todoBytes)
	}
	w.finish(t)
}

// TestRollbackOriginWriteError: the origin fails a restore's write (EIO).
// A client write whose restore fails fails with EIO, changes nothing (the
// cluster still reads as the snapshot's, the other snapshot is exact), and
// goes through when tried again; the rollback then completes. A failure of
// the copier's own restore ends the rollback failed, the cluster reading
// from the snapshot, and a restart completes it.
func TestRollbackOriginWriteError(t *testing.T) {
	ctx := context.Background()
	failWrite := func(w *rbFaults, c uint32) {
		off, n := w.clusterRange(c)
		w.ffs.Inject(vfstest.Rule{Kind: vfstest.OpWrite, Name: "origin", Pred: func(op vfstest.Op) bool { return op.Off == off && op.Len == n }})
	}
	readCluster := func(t *testing.T, w *rbFaults, c uint32, what string) {
		t.Helper()
		off, n := w.clusterRange(c)
		buf := make([]byte, n)
		if err := w.e.ReadAt(ctx, buf, off); err != nil {
			t.Fatalf("%s: read cluster %d: %v", what, c, err)
		}
		if !bytes.Equal(buf, w.model[off:off+n]) {
			t.Fatalf("%s: cluster %d differs from the model at +%d", what, c, firstDiff(buf, w.model[off:off+n]))
		}
	}

	t.Run("client", func(t *testing.T) {
		w := newRBFaults(t, 2)
		todo := w.todo()
		c0, c := todo[0], todo[len(todo)/2]
		// The copier stops on its first cluster, reading it from the
		// store, until released: the client's write restores c itself.
		held, release := w.trap.holdReads(w.trap.slotOf(t, w.a, c0))
		defer release()
		if err := w.e.Rollback(ctx, "a", mustOpen(t, w.fs, "progress"), RollbackOptions{}); err != nil {
			t.Fatal(err)
		}
		copy(w.model, w.imageA)
		select {
		case <-held:
		case <-time.After(10 * time.Second):
			t.Fatal("the copier did not reach its first cluster")
		}
		failWrite(w, c)
		off, _ := w.clusterRange(c)
		if err := w.write(off+17, 100); !errors.Is(err, syscall.EIO) {
			t.Fatalf("write whose restore the origin failed: %v, want EIO", err)
		}
		if w.ffs.Injected() != 1 {
			t.Fatalf("%d faults fired, want the restore's", w.ffs.Injected())
		}
		readCluster(t, w, c, "after the failed write")
		img := make([]byte, rbFaultSize)
		wantImage(t, ctx, w.b.ReadAt, img, w.imageB, "snapshot b after the failed write", true)
		if err := w.write(off+17, 100); err != nil {
			t.Fatalf("the write again: %v", err)
		}
		readCluster(t, w, c, "after the write")
		release()
		w.finish(t)
	})

	t.Run("copier", func(t *testing.T) {
		w := newRBFaults(t, 3)
		todo := w.todo()
		c := todo[len(todo)/2]
		failWrite(w, c)
		if err := w.e.Rollback(ctx, "a", mustOpen(t, w.fs, "progress"), RollbackOptions{}); err != nil {
			t.Fatal(err)
		}
		copy(w.model, w.imageA)
		ri := waitRollback(t, w.e)
		_, n := w.clusterRange(c)
		if ri.State != RollbackFailed || !strings.Contains(ri.Err, "1 clusters could not be restored") ||
			!strings.Contains(ri.Err, syscall.EIO.Error()) || ri.RemainingBytes != n {
			t.Fatalf("rollback whose restore of cluster %d the origin failed ended as %+v", c, ri)
		}
		img := make([]byte, rbFaultSize)
		wantImage(t, ctx, w.e.ReadAt, img, w.model, "origin after the failed rollback", true)
		wantImage(t, ctx, w.b.ReadAt, img, w.imageB, "snapshot b after the failed rollback", true)
		if left, _ := w.restart(t); left != 1 {
			t.Fatalf("resumed rollback with %d clusters left, want 1", left)
		}
		w.finish(t)
	})
}

// TestRollbackSourceInvalidated: the rollback's snapshot turns invalid
// during the rollback (its store fails the copy a write to a cluster it
// had not copied needs). Its reads fail from then on, but the clusters the
// rollback restores were committed before its instant and still read: the
// rollback completes, the origin is the snapshot's image plus the writes,
// and the other snapshot is exact.
func TestRollbackSourceInvalidated(t *testing.T) {
	ctx := context.Background()
	w := newRBFaults(t, 5)
	var fresh []uint32 // clusters a never copied
	for c := range w.a.geo.count {
		if !w.a.cache.copied.get(c) {
			fresh = append(fresh, c)
		}
	}
	if len(fresh) == 0 {
		t.Fatal("snapshot a copied every cluster: no write can invalidate it")
	}
	todo := w.todo()
	held, release := w.trap.holdReads(w.trap.slotOf(t, w.a, todo[0]))
	defer release()
	if err := w.e.Rollback(ctx, "a", mustOpen(t, w.fs, "progress"), RollbackOptions{}); err != nil {
		t.Fatal(err)
	}
	copy(w.model, w.imageA)
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the copier did not reach its first cluster")
	}
	w.trap.mu.Lock()
	w.trap.readOnly = true
	w.trap.mu.Unlock()
	off, n := w.clusterRange(fresh[0])
	if err := w.write(off, min(n, 100)); err != nil {
		t.Fatalf("a write the rollback's snapshot cannot copy: %v", err)
	}
	if info := w.a.Info(); info.Valid {
		t.Fatal("the rollback's snapshot is valid after its store failed a copy")
	}
	if err := w.a.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("read of the invalid snapshot: %v, want ErrInvalid", err)
	}
	off, n = w.clusterRange(todo[len(todo)/2])
	if err := w.write(off+1, n-2); err != nil {
		t.Fatal(err)
	}
	release()
	if ri := waitRollback(t, w.e); ri.State != RollbackComplete {
		t.Fatalf("rollback from a snapshot invalidated during it ended as %+v", ri)
	}
	img := make([]byte, rbFaultSize)
	wantImage(t, ctx, w.e.ReadAt, img, w.model, "origin", true)
	if err := w.e.EndRollback(); err != nil {
		t.Fatal(err)
	}
	phys, _ := w.fs.Contents("origin")
	if !bytes.Equal(phys, w.model) {
		t.Fatalf("the origin file differs from the model at %d", firstDiff(phys, w.model))
	}
	wantImage(t, ctx, w.b.ReadAt, img, w.imageB, "snapshot b", true)
}

// wantNoRollback fails unless the progress file f holds no committed
// rollback and e has none.
func wantNoRollback(t *testing.T, e *Engine, f vfs.File, what string) {
	t.Helper()
	if pf, err := backstore.OpenProgress(f); !errors.Is(err, backstore.ErrNoProgress) {
		if err == nil {
			pf.Close()
		}
		t.Fatalf("%s: the progress file: %v, want no committed rollback", what, err)
	}
	if ri, ok := e.RollbackInfo(); ok {
		t.Fatalf("%s: a rollback: %+v", what, ri)
	}
}

// TestRollbackRefused: Rollback refuses a transient snapshot, an invalid
// one, a bookmark, a missing one and a negative rate, committing nothing;
// while a rollback runs it refuses a second one, snapshot creation, and
// the clear, bookmark and end of the rollback's snapshot, while other
// snapshots can be cleared.
func TestRollbackRefused(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	ffs := vfstest.NewFaultFS(fs)
	e, _, _ := testEngine(t, fs, 128<<10, 9, true)
	defer e.Close()
	create := func(name string, f vfs.File, transient bool) *Snapshot {
		t.Helper()
		s, err := e.Create(ctx, f, SnapshotOptions{Name: name, ClusterSize: 4096, Transient: transient, OriginID: "o"})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	create("p", mustOpen(t, fs, "p"), false)
	create("q", mustOpen(t, fs, "q"), false)
	create("t", mustOpen(t, fs, "t"), true)
	create("bm", mustOpen(t, fs, "bm"), false)
	badFile, err := ffs.OpenFile("bad", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	bad := create("bad", badFile, false)
	ffs.Inject(vfstest.Rule{Kind: vfstest.OpWrite, Name: "bad", Times: -1})
	if err := e.WriteAt(ctx, bytes.Repeat([]byte{7}, 64<<10), 0, false); err != nil {
		t.Fatal(err)
	}
	if bad.Info().Valid {
		t.Fatal("the snapshot whose store fails is valid")
	}
	if err := e.Bookmark("bm"); err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		name string
		opts RollbackOptions
		want error
	}{
		{"t", RollbackOptions{}, ErrBadOption},
		{"bad", RollbackOptions{}, ErrInvalid},
		{"bm", RollbackOptions{}, ErrBookmark},
		{"none", RollbackOptions{}, ErrNotFound},
		{"p", RollbackOptions{Rate: -1}, ErrBadOption},
	} {
		f := mustOpen(t, fs, "refused")
		if err := e.Rollback(ctx, tc.name, f, tc.opts); !errors.Is(err, tc.want) {
			t.Fatalf("rollback %d to %q: %v, want %v", i, tc.name, err, tc.want)
		}
		wantNoRollback(t, e, f, "a refused rollback to "+tc.name)
	}

	// A rollback whose copier restores one cluster, then waits (1 byte/s).
	if err := e.Rollback(ctx, "p", mustOpen(t, fs, "progress"), RollbackOptions{Rate: 1}); err != nil {
		t.Fatal(err)
	}
	second := mustOpen(t, fs, "second")
	for _, name := range []string{"q", "p"} {
		if err := e.Rollback(ctx, name, second, RollbackOptions{}); !errors.Is(err, ErrRollback) {
			t.Fatalf("second rollback to %q: %v, want ErrRollback", name, err)
		}
	}
	if pf, err := backstore.OpenProgress(second); !errors.Is(err, backstore.ErrNoProgress) {
		if err == nil {
			pf.Close()
		}
		t.Fatalf("a refused second rollback's progress file: %v", err)
	}
	if _, err := e.Create(ctx, mustOpen(t, fs, "c"), SnapshotOptions{Name: "c", OriginID: "o"}); !errors.Is(err, ErrRollback) {
		t.Fatalf("create during a rollback: %v", err)
	}
	for what, err := range map[string]error{
		"clear":    e.Clear("p"),
		"bookmark": e.Bookmark("p"),
		"end":      e.EndRollback(),
	} {
		if !errors.Is(err, ErrRollback) {
			t.Fatalf("%s of the rollback's snapshot during the rollback: %v, want ErrRollback", what, err)
		}
	}
	if err := e.Clear("q"); err != nil {
		t.Fatalf("clear of another snapshot during the rollback: %v", err)
	}
	if ri, _ := e.RollbackInfo(); ri.State != RollbackRunning || ri.Snapshot != "p" || ri.Rate != 1 {
		t.Fatalf("rollback info: %+v", ri)
	}
	done := e.RollbackDone()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not stop the copier")
	}
}

// flipCtx is a context without a Done channel whose Err turns to Canceled
// after its first after calls: a client that gives up at a chosen check.
type flipCtx struct {
	context.Context
	calls atomic.Int32
	after int32
}

func (c *flipCtx) Err() error {
	if c.calls.Add(1) > c.after {
		return context.Canceled
	}
	return nil
}

// TestRollbackCancelled: a Rollback whose context ends before the rollback
// instant (before the call, while it waits at the gate for a write in
// flight, or once it holds the gate) returns the context's error and
// commits nothing; the engine goes on, and a rollback can be made then.
func TestRollbackCancelled(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	base := mustOpen(t, fs, "origin")
	data := make([]byte, 128<<10)
	fillRandom(rand.New(rand.NewPCG(4, 4)), data)
	if _, err := base.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	var stall vfstest.Stall
	e, err := NewEngine(stall.Wrap(base), EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := e.Create(ctx, mustOpen(t, fs, "a"), SnapshotOptions{Name: "a", ClusterSize: 4096, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, make([]byte, 40000), 1000, false); err != nil {
		t.Fatal(err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	f := mustOpen(t, fs, "p1")
	if err := e.Rollback(cancelled, "a", f, RollbackOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("rollback with a cancelled context: %v", err)
	}
	if n, _ := f.Size(); n != 0 {
		t.Fatalf("a rollback cancelled before the call wrote %d bytes of progress", n)
	}
	wantNoRollback(t, e, f, "cancelled before the call")

	// A write in flight holds the gate.
	stall.Hold()
	w := writeAsync(e, bytes.Repeat([]byte{9}, 5000), 70000)
	waitFor(t, "the write reaches the origin", func() bool { return stall.Blocked() == 1 }, func() string { return "" })
	timeout, cancelT := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelT()
	f = mustOpen(t, fs, "p2")
	if err := e.Rollback(timeout, "a", f, RollbackOptions{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("rollback whose context ends at the gate: %v", err)
	}
	wantNoRollback(t, e, f, "given up at the gate")
	stall.Resume()
	if err := await(t, w, "the held write"); err != nil {
		t.Fatal(err)
	}
	if err := await(t, writeAsync(e, []byte{1}, 0), "a write after the abandoned rollback"); err != nil {
		t.Fatal(err)
	}

	// Given up once it holds the gate, before the instant.
	f = mustOpen(t, fs, "p3")
	err = e.Rollback(&flipCtx{Context: ctx, after: 1}, "a", f, RollbackOptions{})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "before the rollback instant") {
		t.Fatalf("rollback given up after the gate: %v", err)
	}
	wantNoRollback(t, e, f, "given up after the gate")

	// Nothing is in the way of a rollback now.
	if err := e.Rollback(ctx, "a", mustOpen(t, fs, "progress"), RollbackOptions{}); err != nil {
		t.Fatal(err)
	}
	if ri := waitRollback(t, e); ri.State != RollbackComplete {
		t.Fatalf("rollback: %+v", ri)
	}
	img := make([]byte, len(data))
	wantImage(t, ctx, e.ReadAt, img, data, "origin after the rollback", true)
}

// TestRollbackZeroLengthRead: requests of no bytes during a rollback
// succeed at once, as they do without one. Reproduces a bug: a read of no
// bytes took the clusters of an empty range (the last one before the
// first) and ran off the end of the rollback's bitmaps (a panic).
func TestRollbackZeroLengthRead(t *testing.T) {
	ctx := context.Background()
	const size = 64<<10 + 100
	fs := vfstest.NewMemFS()
	e, _, _ := testEngine(t, fs, size, 12, true)
	defer e.Close()
	if _, err := e.Create(ctx, mustOpen(t, fs, "a"), SnapshotOptions{Name: "a", ClusterSize: 4096, OriginID: "o"}); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, make([]byte, size), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := e.Rollback(ctx, "a", mustOpen(t, fs, "progress"), RollbackOptions{Rate: 1}); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 4096, 5000, size} {
		if err := e.ReadAt(ctx, nil, off); err != nil {
			t.Errorf("read of no bytes at %d: %v", off, err)
		}
		if err := e.WriteAt(ctx, nil, off, true); err != nil {
			t.Errorf("write of no bytes at %d: %v", off, err)
		}
		if err := e.Trim(ctx, off, 0, false); err != nil {
			t.Errorf("trim of no bytes at %d: %v", off, err)
		}
		if err := e.Zero(ctx, off, 0, false); err != nil {
			t.Errorf("zero of no bytes at %d: %v", off, err)
		}
	}
}
