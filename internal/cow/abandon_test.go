package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// The tests in this file stall a backing store (vfstest.Stall: its writes
// and syncs block until resumed) under the engine's real store, and check
// what Abandon, the end of a stop that ran out of time, does about it.

const (
	abandonCS      = 4096
	abandonClust   = 64 // origin size in clusters
	abandonReason  = "daemon stopped before the store caught up"
	abandonPatient = 2 * time.Second // "at once", generously for -race on 2 shared CPUs
)

// recordedOrigin is an origin that knows whether the owner's record of an
// invalidation exists: a write it sees while armed and not recorded is a
// write that went on without copying before the invalidation was durable.
type recordedOrigin struct {
	vfs.File
	armed, recorded atomic.Bool
	early           atomic.Int64 // writes seen armed and not recorded
}

func (o *recordedOrigin) WriteAt(p []byte, off int64) (int, error) {
	if o.armed.Load() && !o.recorded.Load() {
		o.early.Add(1)
	}
	return o.File.WriteAt(p, off)
}

// abandonEnv is an engine over an origin of random data, whose owner's
// record of invalidations is records (nil: the engine has none).
type abandonEnv struct {
	e      *Engine
	fs     *vfstest.MemFS
	origin *recordedOrigin
	data   []byte

	mu      sync.Mutex
	records []string // "name: reason", in call order
}

// reopen reopens the store file name on a new engine over the same origin,
// closed when the test ends.
func (a *abandonEnv) reopen(t *testing.T, name string) *Snapshot {
	t.Helper()
	e, err := NewEngine(a.origin.File, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	r, err := e.Reopen(context.Background(), mustOpen(t, a.fs, name), ReopenOptions{OriginID: "o"})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func newAbandonEnv(t *testing.T, seed uint64, record func(name, reason string) error) *abandonEnv {
	t.Helper()
	fs := vfstest.NewMemFS()
	base := mustOpen(t, fs, "origin")
	data := make([]byte, abandonClust*abandonCS)
	fillRandom(rand.New(rand.NewPCG(seed, 11)), data)
	if _, err := base.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	a := &abandonEnv{fs: fs, origin: &recordedOrigin{File: base}, data: data}
	opts := EngineOptions{}
	if record != nil {
		opts.RecordInvalid = func(name, reason string) error {
			a.mu.Lock()
			a.records = append(a.records, name+": "+reason)
			a.mu.Unlock()
			err := record(name, reason)
			if err == nil {
				a.origin.recorded.Store(true)
			}
			return err
		}
	}
	var err error
	if a.e, err = NewEngine(a.origin, opts); err != nil {
		t.Fatal(err)
	}
	return a
}

// create takes a snapshot into a store file of the MemFS, wrapped by stall.
func (a *abandonEnv) create(t *testing.T, name string, stall *vfstest.Stall, transient bool) *Snapshot {
	t.Helper()
	s, err := a.e.Create(context.Background(), stall.Wrap(mustOpen(t, a.fs, name+".cow")),
		SnapshotOptions{Name: name, ClusterSize: abandonCS, CacheBytes: 1, Transient: transient, OriginID: "o"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// write writes n clusters of b from cluster c, on its own goroutine.
func (a *abandonEnv) write(c, n int, b byte) <-chan error {
	return writeAsync(a.e, bytes.Repeat([]byte{b}, n*abandonCS), int64(c)*abandonCS)
}

// expect returns the origin's data after writes of b over clusters
// [c, c+n) for each (c, n, b) given.
func (a *abandonEnv) expect(writes ...[3]int) []byte {
	want := bytes.Clone(a.data)
	for _, w := range writes {
		copy(want[w[0]*abandonCS:], bytes.Repeat([]byte{byte(w[2])}, w[1]*abandonCS))
	}
	return want
}

func (a *abandonEnv) originIs(t *testing.T, want []byte, when string) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := a.origin.File.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: the origin does not hold exactly the acknowledged writes", when)
	}
}

func (a *abandonEnv) recorded() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.records...)
}

// notDone fails the test if ch delivered.
func notDone(ch <-chan error) func() string {
	return func() string {
		select {
		case err := <-ch:
			return "the write waiting for the stalled store completed: " + errString(err)
		default:
			return ""
		}
	}
}

// TestAbandonStalledStore is a stop that runs out of time under a
// persistent snapshot whose store stalled: a write larger than the cache
// waits for cache space while the writer is stuck in a commit that does not
// return. Abandon returns at once, invalidates the snapshot with the reason,
// records that in the owner's record before the waiting write touches the
// origin, and releases the write, which completes. Close then returns at
// once, leaving the stalled store alone. Every acknowledged write is on
// the origin; the snapshot reads fail as invalid. Once the disk answers
// again, the writer also records the invalidation in the store's header,
// so the store alone reopens invalid with the reason too.
func TestAbandonStalledStore(t *testing.T) {
	a := newAbandonEnv(t, 1, func(string, string) error { return nil })
	var stall vfstest.Stall
	defer stall.Resume() // a failed test must not leave the writer stuck
	s := a.create(t, "s", &stall, false)
	if err := <-a.write(0, 2, 0xa1); err != nil { // acknowledged before the stall
		t.Fatal(err)
	}

	stall.Hold()
	a.origin.armed.Store(true)
	big := a.write(8, 48, 0xb2) // 48 clusters, 32 cache slots
	waitFor(t, "the writer is stuck in the store and the write waits for cache space",
		func() bool { return stall.Blocked() > 0 && parked("sync.Cond.Wait", "copyCluster") > 0 },
		notDone(big))
	a.originIs(t, a.expect([3]int{0, 2, 0xa1}), "while the store is stalled")

	start := time.Now()
	names, err := a.e.Abandon(abandonReason)
	if err != nil || len(names) != 1 || names[0] != "s" {
		t.Fatalf("Abandon = %v, %v; want [s]", names, err)
	}
	if err := await(t, big, "the released write"); err != nil {
		t.Fatalf("released write: %v", err)
	}
	closed := make(chan error, 1)
	go func() { closed <- a.e.Close() }()
	if err := await(t, closed, "Close after Abandon"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if d := time.Since(start); d > abandonPatient {
		t.Fatalf("Abandon, the released write and Close took %v with the store stalled", d)
	}
	t.Logf("Abandon, the released write and Close: %v with the store stalled", time.Since(start))

	if n := a.origin.early.Load(); n != 0 {
		t.Fatalf("%d origin writes went on before the invalidation was recorded", n)
	}
	if got := a.recorded(); len(got) != 1 || got[0] != "s: "+abandonReason {
		t.Fatalf("owner's record: %q; want one invalidation of s with the reason", got)
	}
	a.originIs(t, a.expect([3]int{0, 2, 0xa1}, [3]int{8, 48, 0xb2}), "after the stop")
	if i := s.Info(); i.Valid || i.Reason != abandonReason {
		t.Fatalf("snapshot valid=%v reason %q; want invalid for %q", i.Valid, i.Reason, abandonReason)
	}
	if err := s.ReadAt(context.Background(), make([]byte, abandonCS), 0); err == nil {
		t.Fatal("a read of the snapshot given up on succeeded")
	}

	// The disk answers again: the writer finishes its commit and records
	// the invalidation in the store's header (its owner's record again,
	// which is harmless), then ends.
	stall.Resume()
	select {
	case <-s.commits.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not end once the store answered again")
	}
	r := a.reopen(t, "s.cow")
	if i := r.Info(); i.Valid || i.Reason != abandonReason {
		t.Fatalf("reopened store valid=%v reason %q; want invalid for %q", i.Valid, i.Reason, abandonReason)
	}
}

// TestAbandonCannotRecord: when the invalidation cannot be recorded (the
// owner's record fails, or the engine has none), Abandon does not release
// the snapshot: the write waiting for it stays blocked and the origin
// untouched, so the store, which still says valid, is right. When the disk
// answers again, the writer records the invalidation in the store's header
// and releases the write, as for any failure.
func TestAbandonCannotRecord(t *testing.T) {
	recordErr := errors.New("state directory unwritable")
	for _, tt := range []struct {
		name   string
		record func(string, string) error
	}{
		{"record fails", func(string, string) error { return recordErr }},
		{"no owner's record", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := newAbandonEnv(t, 2, tt.record)
			var stall vfstest.Stall
			defer stall.Resume()
			s := a.create(t, "s", &stall, false)
			stall.Hold()
			big := a.write(8, 48, 0xb2)
			waitFor(t, "the write waits for the stalled store",
				func() bool { return stall.Blocked() > 0 && parked("sync.Cond.Wait", "copyCluster") > 0 },
				notDone(big))

			names, err := a.e.Abandon(abandonReason)
			if len(names) != 0 || err == nil || !strings.Contains(err.Error(), `snapshot "s"`) ||
				(tt.record != nil && !errors.Is(err, recordErr)) {
				t.Fatalf("Abandon = %v, %v; want no snapshot released and an error naming s", names, err)
			}
			select {
			case err := <-big:
				t.Fatalf("the write went on (%v) although the invalidation is recorded nowhere", errString(err))
			case <-time.After(50 * time.Millisecond):
			}
			a.originIs(t, a.data, "after Abandon could not record")
			if i := s.Info(); i.Valid || i.Reason != abandonReason {
				t.Fatalf("snapshot valid=%v reason %q", i.Valid, i.Reason)
			}

			stall.Resume()
			if err := await(t, big, "the write once the store answered"); err != nil {
				t.Fatal(err)
			}
			if err := a.e.Close(); err != nil {
				t.Fatal(err)
			}
			a.originIs(t, a.expect([3]int{8, 48, 0xb2}), "after the store answered")
			r := a.reopen(t, "s.cow")
			if i := r.Info(); i.Valid || i.Reason != abandonReason {
				t.Fatalf("reopened store valid=%v reason %q", i.Valid, i.Reason)
			}
		})
	}
}

// TestAbandonSparesCaughtUpSnapshots: Abandon gives up only on snapshots
// whose store is behind. A persistent snapshot that has committed all it
// copied stays valid, is closed cleanly and reopens bit-exact; a transient
// one whose writer is stuck, with a write waiting for its cache, is
// invalidated and released at once, without the owner's record (it is
// never reopened).
func TestAbandonSparesCaughtUpSnapshots(t *testing.T) {
	a := newAbandonEnv(t, 3, func(name, _ string) error {
		if name != "p" {
			t.Errorf("owner's record asked to invalidate %q", name)
		}
		return nil
	})
	var fine, stall vfstest.Stall
	defer stall.Resume()
	p := a.create(t, "p", &fine, false)
	if err := <-a.write(8, 48, 0xc3); err != nil { // p copies and commits these
		t.Fatal(err)
	}
	tr := a.create(t, "t", &stall, true)
	stall.Hold()
	big := a.write(8, 48, 0xd4) // p has them; t needs 48 with 32 slots
	waitFor(t, "the write waits for the transient snapshot's cache",
		func() bool { return stall.Blocked() > 0 && parked("sync.Cond.Wait", "copyCluster") > 0 },
		notDone(big))

	names, err := a.e.Abandon(abandonReason)
	if err != nil || len(names) != 1 || names[0] != "t" {
		t.Fatalf("Abandon = %v, %v; want [t]", names, err)
	}
	if err := await(t, big, "the released write"); err != nil {
		t.Fatal(err)
	}
	if got := a.recorded(); len(got) != 0 {
		t.Fatalf("owner's record called: %q", got)
	}
	if i := tr.Info(); i.Valid || i.Reason != abandonReason {
		t.Fatalf("transient snapshot valid=%v reason %q", i.Valid, i.Reason)
	}
	if i := p.Info(); !i.Valid {
		t.Fatalf("caught-up snapshot invalidated: %q", i.Reason)
	}
	if err := a.e.Close(); err != nil {
		t.Fatal(err)
	}
	a.originIs(t, a.expect([3]int{8, 48, 0xd4}), "after the stop")

	r := a.reopen(t, "p.cow")
	got := make([]byte, len(a.data))
	if err := r.ReadAt(context.Background(), got, 0); err != nil || !bytes.Equal(got, a.data) {
		t.Fatalf("the caught-up snapshot does not reopen bit-exact (read: %v)", err)
	}
}

// TestAbandonDuringClose: Close is stopping a writer stuck in a commit (a
// transient snapshot's last batch) when Abandon comes: Close returns at
// once, leaving that store open.
func TestAbandonDuringClose(t *testing.T) {
	a := newAbandonEnv(t, 4, func(string, string) error { return nil })
	var stall vfstest.Stall
	defer stall.Resume()
	s := a.create(t, "t", &stall, true)
	stall.Hold()
	if err := <-a.write(0, 4, 0xe5); err != nil { // transient: waits for the cache only
		t.Fatal(err)
	}
	waitFor(t, "the writer is stuck in the store", func() bool { return stall.Blocked() > 0 }, func() string { return "" })
	closed := make(chan error, 1)
	go func() { closed <- a.e.Close() }()
	waitFor(t, "Close waits for the writer",
		func() bool { return parked("select", "(*Snapshot).stop") > 0 },
		notDone(closed))
	if names, err := a.e.Abandon(abandonReason); err != nil || len(names) != 1 || names[0] != "t" {
		t.Fatalf("Abandon = %v, %v; want [t]", names, err)
	}
	if err := await(t, closed, "Close after Abandon"); err != nil {
		t.Fatal(err)
	}
	a.originIs(t, a.expect([3]int{0, 4, 0xe5}), "after the stop")
	stall.Resume()
	select {
	case <-s.commits.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer did not end once the store answered again")
	}
}

// TestAbandonCommitLeader: a write that leads its own commit (persistent
// mode, no cache pressure) is itself inside the store call that does not
// return. Abandon records the invalidation and returns without waiting for
// it; the write cannot be released (its owner cuts its connection), and it
// writes the origin only once the store returned, after the record.
func TestAbandonCommitLeader(t *testing.T) {
	a := newAbandonEnv(t, 5, func(string, string) error { return nil })
	var stall vfstest.Stall
	defer stall.Resume()
	a.create(t, "s", &stall, false)
	stall.Hold()
	a.origin.armed.Store(true)
	w := a.write(3, 1, 0xf6)
	waitFor(t, "the write is committing its cluster itself", func() bool { return stall.Blocked() > 0 }, notDone(w))
	if names, err := a.e.Abandon(abandonReason); err != nil || len(names) != 1 {
		t.Fatalf("Abandon = %v, %v; want [s]", names, err)
	}
	select {
	case err := <-w:
		t.Fatalf("the write returned (%v) while inside the stalled store", errString(err))
	case <-time.After(50 * time.Millisecond):
	}
	a.originIs(t, a.data, "while the leader is in the store")
	stall.Resume()
	if err := await(t, w, "the write once the store answered"); err != nil {
		t.Fatal(err)
	}
	if n := a.origin.early.Load(); n != 0 {
		t.Fatalf("%d origin writes before the invalidation was recorded", n)
	}
	if err := a.e.Close(); err != nil {
		t.Fatal(err)
	}
	a.originIs(t, a.expect([3]int{3, 1, 0xf6}), "after the stop")
}

// TestInfoDuringStalledClear: a clear whose store stopped answering holds
// the snapshot while it closes the store; Info (the daemon's status) answers
// meanwhile instead of waiting for the disk.
func TestInfoDuringStalledClear(t *testing.T) {
	a := newAbandonEnv(t, 5, nil)
	var stall vfstest.Stall
	s := a.create(t, "s", &stall, false)
	if err := <-a.write(0, 1, 7); err != nil {
		t.Fatal(err)
	}
	stall.Hold()
	cleared := make(chan error, 1)
	go func() { cleared <- a.e.Clear("s") }()
	for stall.Blocked() == 0 {
		time.Sleep(time.Millisecond)
	}
	info := make(chan Info, 1)
	go func() { info <- s.Info() }()
	select {
	case i := <-info:
		if i.Name != "s" || i.StoreBytes != 0 {
			t.Errorf("info during the clear: %+v", i)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Info waits for a clear stuck on its store")
	}
	stall.Resume()
	if err := <-cleared; err != nil {
		t.Fatal(err)
	}
}
