package cow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// heldFixture is an engine with one persistent snapshot s1 (64 KiB
// clusters) whose commits can be blocked: while commits holds its lock,
// every commit waits, so first writes stay held.
type heldFixture struct {
	e       *Engine
	s       *Snapshot
	origin  vfs.File // the raw origin, under the engine
	frozen  []byte
	commits sync.Mutex
	failing bool // commits fail (under commits)
	faults  *vfstest.FaultFS
	log     *HeldLog
}

// useHeldLog gives e a held-writes log of size bytes in a temporary
// directory and makes it hold writes whatever its stores' syncs cost. The
// log is closed after the engine (cleanups run last first).
func useHeldLog(t testing.TB, e *Engine, size int64) *HeldLog {
	t.Helper()
	l, err := CreateHeldLog(filepath.Join(t.TempDir(), "held"), size, "test")
	if err != nil {
		t.Fatal(err)
	}
	e.UseHeldLog(l)
	e.held.minSync = 0
	return l
}

func newHeldFixture(t *testing.T, logSize int64) *heldFixture {
	t.Helper()
	f := &heldFixture{faults: vfstest.NewFaultFS(nil)}
	fs := vfstest.NewMemFS()
	f.origin = mustOpen(t, fs, "origin")
	f.frozen = make([]byte, 16<<20)
	fillRandom(rand.New(rand.NewPCG(1, 2)), f.frozen)
	if _, err := f.origin.WriteAt(f.frozen, 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(f.faults.Wrap("origin", f.origin), EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f.log = useHeldLog(t, e, logSize)
	t.Cleanup(func() { f.log.Close() })
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
		m := newMemStore(o)
		m.fail = func(int) error {
			f.commits.Lock()
			defer f.commits.Unlock()
			if f.failing {
				return errors.New("injected store failure")
			}
			return nil
		}
		return m, nil
	}
	f.e = e
	f.s = f.create(t, "s1")
	t.Cleanup(func() { e.Close() })
	return f
}

func (f *heldFixture) create(t *testing.T, name string) *Snapshot {
	t.Helper()
	s, err := f.e.Create(context.Background(), nil, SnapshotOptions{Name: name, ClusterSize: 64 << 10, CacheBytes: 8 << 20, OriginID: "o"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// raw reads the origin under the engine: what a crash would find.
func (f *heldFixture) raw(t *testing.T, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := readFull(f.origin, p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

// async runs fn on a goroutine; its result arrives on the channel.
func async(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

func pending(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s returned (%v) while the commit it needs is blocked", what, err)
	case <-time.After(50 * time.Millisecond):
	}
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

// A first write is answered while its commit is blocked; the origin does
// not have it yet (a crash would find the old data, which the store may
// not have), a read of the origin waits for it and sees it, and the
// snapshot keeps the old data.
func TestHeldAnswersBeforeCommit(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	f.commits.Lock()
	w := async(func() error { return f.e.WriteAt(ctx, fill(4096, 'a'), 100, false) })
	if err := await(t, w, "held write"); err != nil {
		t.Fatal(err)
	}
	if got := f.e.Held(); got.Writes != 1 || got.Bytes != 4096+heldWriteCost || got.Total != 1 {
		t.Fatalf("Held() = %+v, want one write", got)
	}
	if !bytes.Equal(f.raw(t, 100, 4096), f.frozen[100:4196]) {
		t.Fatal("the held write reached the origin before its commit")
	}
	p := make([]byte, 8192)
	r := async(func() error { return f.e.ReadAt(ctx, p, 0) })
	pending(t, r, "read of the held range")
	ext := async(func() error { _, err := f.e.Extents(ctx, 0, 8192); return err })
	pending(t, ext, "block status of the held range")
	other := make([]byte, 4096)
	if err := f.e.ReadAt(ctx, other, 512<<10); err != nil || !bytes.Equal(other, f.frozen[512<<10:512<<10+4096]) {
		t.Fatalf("read elsewhere: %v", err)
	}
	f.commits.Unlock()
	if err := await(t, r, "read"); err != nil {
		t.Fatal(err)
	}
	if err := await(t, ext, "block status"); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(f.frozen[:8192])
	copy(want[100:], fill(4096, 'a'))
	if !bytes.Equal(p, want) {
		t.Fatalf("read differs from the answered write at %d", firstDiff(p, want))
	}
	snap := make([]byte, 8192)
	if err := f.s.ReadAt(ctx, snap, 0); err != nil || !bytes.Equal(snap, f.frozen[:8192]) {
		t.Fatalf("snapshot read: %v", err)
	}
	if err := f.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.e.Held(); got.Writes != 0 || got.Bytes != 0 {
		t.Fatalf("after flush Held() = %+v", got)
	}
}

// Overlapping writes reach the origin in the order they were answered:
// held behind held, and a FUA write (never held) behind a held one.
func TestHeldOverlapOrder(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	f.commits.Lock()
	for i, w := range []struct {
		off int64
		b   byte
	}{{0, 'a'}, {4096, 'b'}, {70 << 10, 'c'}, {2048, 'd'}} {
		if err := await(t, async(func() error { return f.e.WriteAt(ctx, fill(8192, w.b), w.off, false) }), "write"); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if got := f.e.Held().Writes; got != 4 {
		t.Fatalf("%d writes held, want 4", got)
	}
	fua := async(func() error { return f.e.WriteAt(ctx, fill(1024, 'e'), 3072, true) })
	pending(t, fua, "FUA write behind held writes")
	zero := async(func() error { return f.e.Zero(ctx, 9000, 100, false) })
	pending(t, zero, "zero behind held writes")
	f.commits.Unlock()
	for _, ch := range []<-chan error{fua, zero} {
		if err := await(t, ch, "write"); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(f.frozen[:128<<10])
	copy(want[0:], fill(8192, 'a'))
	copy(want[4096:], fill(8192, 'b'))
	copy(want[70<<10:], fill(8192, 'c'))
	copy(want[2048:], fill(8192, 'd'))
	copy(want[3072:], fill(1024, 'e'))
	clear(want[9000:9100])
	if got := f.raw(t, 0, 128<<10); !bytes.Equal(got, want) {
		t.Fatalf("origin differs from the writes in answer order at %d", firstDiff(got, want))
	}
}

// Held writes never exceed the budget: a write that does not fit waits
// for its commit before its answer.
func TestHeldBudget(t *testing.T) {
	f := newHeldFixture(t, MinHeldLogSize)
	ctx := context.Background()
	f.commits.Lock()
	if err := await(t, async(func() error { return f.e.WriteAt(ctx, fill(600<<10, 'a'), 0, false) }), "write"); err != nil {
		t.Fatal(err)
	}
	second := async(func() error { return f.e.WriteAt(ctx, fill(600<<10, 'b'), 4<<20, false) })
	pending(t, second, "write over the budget")
	if got := f.e.Held(); got.Writes != 1 || got.Bytes > got.Budget {
		t.Fatalf("Held() = %+v", got)
	}
	f.commits.Unlock()
	if err := await(t, second, "write over the budget"); err != nil {
		t.Fatal(err)
	}
	if got := f.e.Held().Total; got != 1 {
		t.Fatalf("%d writes held in all, want 1", got)
	}
}

// A held write the origin refuses fails every later FLUSH, as a disk
// reports a lost cached write.
func TestHeldOriginError(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	f.faults.Inject(vfstest.Rule{Kind: vfstest.OpWrite, Name: "origin"})
	if err := f.e.WriteAt(ctx, fill(4096, 'a'), 0, false); err != nil {
		t.Fatalf("held write answered with %v", err)
	}
	for range 2 {
		if err := f.e.Flush(ctx); !errors.Is(err, syscall.EIO) {
			t.Fatalf("flush after a failed held write: %v, want EIO", err)
		}
	}
	if !f.e.Held().Failed {
		t.Fatal("Held().Failed not set")
	}
}

// A store that fails while writes are held: the snapshot turns invalid,
// the held writes reach the origin, nothing answered is lost.
func TestHeldStoreFails(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	f.commits.Lock()
	for i := range 8 {
		if err := await(t, async(func() error {
			return f.e.WriteAt(ctx, fill(4096, byte('a'+i)), int64(i)*(64<<10), false)
		}), "write"); err != nil {
			t.Fatal(err)
		}
	}
	f.failing = true
	f.commits.Unlock()
	if err := f.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if got := f.raw(t, int64(i)*(64<<10), 4096); !bytes.Equal(got, fill(4096, byte('a'+i))) {
			t.Fatalf("held write %d lost", i)
		}
	}
	if info := f.s.Info(); info.Valid {
		t.Fatal("snapshot still valid after its store failed")
	}
	if err := f.s.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("read of the failed snapshot: %v", err)
	}
}

// Create and Clear drain held writes: a create's image holds every write
// answered before its instant, and no held write outlives its snapshot.
func TestHeldCreateClearDrain(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	f.commits.Lock()
	if err := await(t, async(func() error { return f.e.WriteAt(ctx, fill(4096, 'a'), 0, false) }), "write"); err != nil {
		t.Fatal(err)
	}
	var s2 *Snapshot
	create := async(func() error {
		var err error
		s2, err = f.e.Create(ctx, nil, SnapshotOptions{Name: "s2", ClusterSize: 64 << 10, OriginID: "o"})
		return err
	})
	pending(t, create, "create with a write held")
	f.commits.Unlock()
	if err := await(t, create, "create"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := s2.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, fill(4096, 'a')) {
		t.Fatalf("s2 lacks the write answered before its instant (%v)", err)
	}

	f.commits.Lock()
	if err := await(t, async(func() error { return f.e.WriteAt(ctx, fill(4096, 'b'), 128<<10, false) }), "write"); err != nil {
		t.Fatal(err)
	}
	clr := async(func() error { return f.e.Clear("s1") })
	pending(t, clr, "clear with a write held")
	f.commits.Unlock()
	if err := await(t, clr, "clear"); err != nil {
		t.Fatal(err)
	}
	if f.e.Held().Writes != 0 {
		t.Fatal("a write is held after clear")
	}
	if got := f.raw(t, 128<<10, 4096); !bytes.Equal(got, fill(4096, 'b')) {
		t.Fatal("the write held before clear is not on the origin")
	}
}

// Without a read, flush or change waiting, held writes still reach the
// origin: when half the cache waits for a commit, or after holdDelay.
func TestHeldCommitsWithoutWaiters(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	if err := f.e.WriteAt(ctx, fill(4096, 'a'), 0, false); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !bytes.Equal(f.raw(t, 0, 4096), fill(4096, 'a')) {
		if time.Now().After(deadline) {
			t.Fatal("a lone held write never reached the origin")
		}
		time.Sleep(time.Millisecond)
	}
	// Half the cache's slots: the commit is due at once.
	for i := range f.s.cache.nslots/2 + 1 {
		if err := f.e.WriteAt(ctx, fill(512, 'b'), int64(i+1)*(64<<10), false); err != nil {
			t.Fatal(err)
		}
	}
	if f.s.Info().Stats.CacheFullWaits != 0 {
		t.Fatal("writes waited for cache space")
	}
}

// A killed daemon leaves in its log exactly the writes it answered and may
// not have issued, in answer order: replayed over the origin it left, they
// give the origin every answered write.
func TestHeldLogAfterKill(t *testing.T) {
	f := newHeldFixture(t, 8<<20)
	ctx := context.Background()
	want := bytes.Clone(f.frozen)
	write := func(off int64, n int, b byte) {
		t.Helper()
		if err := await(t, async(func() error { return f.e.WriteAt(ctx, fill(n, b), off, false) }), "write"); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], fill(n, b))
	}
	write(0, 8192, 'a') // issued before the "kill"
	if err := f.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	f.commits.Lock()
	write(1<<20, 8192, 'b')
	write(1<<20+4096, 8192, 'c') // overlaps b: replayed after it
	write(5<<20, 100, 'd')
	// The process dies here: what is in the log file now is what a kill
	// leaves (the mapping is shared; nothing is flushed by a kill).
	recs, err := ReadHeldLog(f.log.f.Name(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("%d records in the log, want the 3 held writes", len(recs))
	}
	img := f.raw(t, 0, int64(len(f.frozen)))
	for i, r := range recs {
		if i > 0 && r.Seq <= recs[i-1].Seq {
			t.Fatalf("records out of order: %d after %d", r.Seq, recs[i-1].Seq)
		}
		copy(img[r.Off:], r.Data)
	}
	if !bytes.Equal(img, want) {
		t.Fatalf("origin plus the log differs from the answered writes at %d", firstDiff(img, want))
	}
	var other *OtherTagError
	if recs, err := ReadHeldLog(f.log.f.Name(), "another boot"); !errors.As(err, &other) || other.Tag != "test" || recs != nil {
		t.Fatalf("a log of another tag: %d records, %v", len(recs), err)
	}
	for _, c := range []struct {
		name    string
		content []byte
		err     error
	}{
		{"missing", nil, nil},
		{"empty", []byte{}, nil},
		{"not ours", []byte("precious data of somebody else"), ErrNotHeldLog},
	} {
		p := filepath.Join(t.TempDir(), "held")
		if c.content != nil {
			if err := os.WriteFile(p, c.content, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if recs, err := ReadHeldLog(p, "test"); !errors.Is(err, c.err) || len(recs) != 0 {
			t.Errorf("%s file: %d records, %v; want none, %v", c.name, len(recs), err, c.err)
		}
	}
	f.commits.Unlock()
	if err := f.e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if recs, err := ReadHeldLog(f.log.f.Name(), "test"); err != nil || len(recs) != 0 {
		t.Fatalf("after a flush the log holds %d records (%v)", len(recs), err)
	}
}

// The ring under random record sizes and out-of-order issue: the file
// always lists exactly the records published and not issued, in order,
// and a full ring refuses rather than overwrite.
func TestHeldLogRing(t *testing.T) {
	for _, seed := range seeds(8, 77) {
		r := rand.New(rand.NewPCG(seed, 3))
		l, err := CreateHeldLog(filepath.Join(t.TempDir(), "held"), MinHeldLogSize, "ring")
		if err != nil {
			t.Fatal(err)
		}
		type live struct {
			at   int64
			seq  uint64
			off  int64
			data []byte
		}
		var held []live
		var seq uint64
		refused := 0
		for i := range 3000 {
			if len(held) > 0 && r.IntN(2) == 0 {
				k := r.IntN(len(held))
				l.issued(held[k].at)
				held = append(held[:k], held[k+1:]...)
			} else {
				n := 1 + r.IntN(200<<10)
				off := r.Int64N(1 << 30)
				at, p, ok := l.alloc(n, off)
				if !ok {
					refused++
					continue
				}
				seq++
				fillRandom(r, p)
				l.publish(at)
				held = append(held, live{at, seq, off, bytes.Clone(p)})
			}
			if i%50 != 0 {
				continue
			}
			got, err := parseHeldLog(l.mem, "ring")
			if err != nil {
				t.Fatalf("seed %d op %d: %v", seed, i, err)
			}
			if len(got) != len(held) {
				t.Fatalf("seed %d op %d: %d records, want %d", seed, i, len(got), len(held))
			}
			for j, h := range held {
				if got[j].Seq != h.seq || got[j].Off != h.off || !bytes.Equal(got[j].Data, h.data) {
					t.Fatalf("seed %d op %d: record %d differs", seed, i, j)
				}
			}
		}
		if refused == 0 {
			t.Errorf("seed %d: the ring never filled", seed)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzParseHeldLog: whatever the file holds, reading it returns records
// inside it or an error, never a panic.
func FuzzParseHeldLog(f *testing.F) {
	l, err := CreateHeldLog(filepath.Join(f.TempDir(), "held"), MinHeldLogSize, "fuzz")
	if err != nil {
		f.Fatal(err)
	}
	for i := range 5 {
		at, p, _ := l.alloc(100*i+1, int64(i)<<20)
		p[0] = byte(i)
		l.publish(at)
		if i%2 == 0 {
			l.issued(at)
		}
	}
	// The seed: the header and the start of the ring (the rest is zero).
	seed := bytes.Clone(l.mem[:heldLogHeaderSize+8192])
	l.Close()
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		// Grow to the ring size the header claims when it is small, so
		// that the records themselves are parsed.
		if len(b) >= heldLogHeaderSize {
			if size := binary.LittleEndian.Uint64(b[80:]); size < 1<<22 && uint64(len(b)-heldLogHeaderSize) < size {
				b = append(b, make([]byte, size-uint64(len(b)-heldLogHeaderSize))...)
			}
		}
		recs, err := parseHeldLog(b, "fuzz")
		if err != nil {
			return
		}
		for _, r := range recs {
			if r.Off < 0 || len(r.Data) > len(b) {
				t.Fatalf("record %+v out of its file", r.Seq)
			}
		}
	})
}
