package cow

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestCreateGivesUpWaitingForGate: a Create whose context ends while it
// waits at the gate for an origin write in flight (held here until the test
// releases it) returns the context's error and leaves no snapshot: no store
// was made, the origin was not synced for it, the name stays free. The wait
// it abandoned must not keep the gate: once the write completes, the gate
// is released behind it, so origin writes go on and the same name can be
// created. Kills: lockGate ignoring ctx (Create would wait for the write),
// and lockGate abandoning the wait without releasing the gate it later
// gets (every origin write would then hang).
func TestCreateGivesUpWaitingForGate(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		// cancel: the test cancels ctx once Create waits at the gate.
		cancel  bool
		wantErr error
	}{
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 50*time.Millisecond)
		}, false, context.DeadlineExceeded},
		{"cancel", func() (context.Context, context.CancelFunc) {
			return context.WithCancel(context.Background())
		}, true, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const cs, size, c = 4096, 16 * 4096, 2
			off := int64(c * cs)
			e, origin, fs, data := heldOrigin(t, size, off)
			releaseWrite := sync.OnceFunc(func() { close(origin.release) })
			defer releaseWrite() // a failed test must not leave the write held
			var stores atomic.Int64
			e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
				stores.Add(1)
				return newMemStore(o), nil
			}
			p := bytes.Repeat([]byte{0x5A}, 512)
			w := writeAsync(e, p, off)
			select {
			case <-origin.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the write did not reach the origin")
			}
			syncs := origin.syncs.Load()

			ctx, cancel := tc.ctx()
			defer cancel()
			created := make(chan error, 1)
			go func() {
				_, err := e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: cs})
				created <- err
			}()
			if tc.cancel {
				// Cancel only once Create's wait for the gate is queued.
				waitFor(t, "Create waits at the gate",
					func() bool { return parked("sync.RWMutex.Lock", "lockGate") > 0 },
					func() string { return "" })
				cancel()
			}
			select {
			case err := <-created:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Create: %v, want an error wrapping %v", err, tc.wantErr)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Create did not give up when its context ended while it waited at the gate")
			}
			// It gave up at the gate, not before: its wait is still queued
			// behind the write.
			waitFor(t, "the abandoned wait is queued at the gate",
				func() bool { return parked("sync.RWMutex.Lock", "lockGate") > 0 },
				func() string { return "" })
			if n := parked("sync.RWMutex.Lock", "lockGate"); n != 1 {
				t.Fatalf("%d abandoned waits for the gate, want 1", n)
			}
			if n := len(e.Snapshots()); n != 0 {
				t.Fatalf("%d snapshots after an abandoned Create", n)
			}
			if n := stores.Load(); n != 0 {
				t.Fatalf("an abandoned Create made %d stores", n)
			}
			if origin.syncs.Load() != syncs {
				t.Fatal("an abandoned Create synced the origin")
			}

			releaseWrite()
			if err := await(t, w, "the held write"); err != nil {
				t.Fatal(err)
			}
			// The abandoned wait gets the gate after the write and must
			// hand it back: origin writes go on.
			q := bytes.Repeat([]byte{0x6B}, 100)
			if err := await(t, writeAsync(e, q, 9*cs), "an origin write after the abandoned Create"); err != nil {
				t.Fatal(err)
			}
			frozen := bytes.Clone(data)
			copy(frozen[off:], p)
			copy(frozen[9*cs:], q)
			s, err := e.Create(context.Background(), nil, SnapshotOptions{Name: "s", ClusterSize: cs})
			if err != nil {
				t.Fatalf("Create of the same name once the write completed: %v", err)
			}
			r := bytes.Repeat([]byte{0x7C}, cs)
			if err := e.WriteAt(context.Background(), r, off, false); err != nil {
				t.Fatal(err)
			}
			img := make([]byte, size)
			wantImage(t, context.Background(), s.ReadAt, img, frozen, "snapshot", true)
			want := bytes.Clone(frozen)
			copy(want[off:], r)
			if got, _ := fs.Contents("origin"); !bytes.Equal(got, want) {
				t.Fatalf("origin differs at %d", firstDiff(got, want))
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// releaseRecorder is a store that records whether the engine released it
// (closed it, leaving the file to the caller) or closed it with its file.
type releaseRecorder struct {
	clusterStore
	released, closed atomic.Int64
}

func (r *releaseRecorder) release() error { r.released.Add(1); return r.clusterStore.release() }
func (r *releaseRecorder) close() error   { r.closed.Add(1); return r.clusterStore.close() }

// TestCreateAbandonedAfterStoreHeader: a Create whose context ends after the
// store header was written, but before the create instant, gives up: it
// returns the context's error, no snapshot exists, and the store is
// released, not closed: the caller keeps the file (open, holding the header
// it may discard) as Create's contract says. The name is free afterwards.
// Kills: Create not checking ctx after making the store (the snapshot would
// be established for a caller who was told it failed), and closing the
// caller's file.
func TestCreateAbandonedAfterStoreHeader(t *testing.T) {
	const size = 64 << 10
	fs := vfstest.NewMemFS()
	e, _, data := testEngine(t, fs, size, 8, true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var rec *releaseRecorder
	e.newStore = func(f vfs.File, o storeOptions) (clusterStore, error) {
		st, err := createBackstore(f, o)
		if err != nil {
			return nil, err
		}
		cancel() // the client gives up once the header is durable
		rec = &releaseRecorder{clusterStore: st}
		return rec, nil
	}
	f := mustOpen(t, fs, "store")
	_, err := e.Create(ctx, f, SnapshotOptions{Name: "s", ClusterSize: 4096, OriginID: "o"})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Create: %v, want an error wrapping context.Canceled", err)
	}
	if rec == nil {
		t.Fatal("the store was never made: the test did not reach the point it is about")
	}
	if n := len(e.Snapshots()); n != 0 {
		t.Fatalf("%d snapshots after an abandoned Create", n)
	}
	if r, c := rec.released.Load(), rec.closed.Load(); r != 1 || c != 0 {
		t.Fatalf("abandoned store released %d times and closed %d times, want 1 and 0", r, c)
	}
	// The caller's file is still open and holds the header Create wrote.
	h, err := backstore.Identify(f)
	if err != nil || h.Name != "s" {
		t.Fatalf("the caller's store file after an abandoned Create: header %+v, %v", h, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("the caller's store file was closed by the engine: %v", err)
	}

	// Nothing was established: origin writes are not copied, and the name
	// is free.
	if err := e.WriteAt(context.Background(), bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	frozen := bytes.Clone(data)
	copy(frozen, bytes.Repeat([]byte{1}, 4096))
	e.newStore = createBackstore
	s, err := e.Create(context.Background(), mustOpen(t, fs, "store2"), SnapshotOptions{Name: "s", ClusterSize: 4096, OriginID: "o"})
	if err != nil {
		t.Fatalf("Create of the same name after the abandoned one: %v", err)
	}
	if err := e.WriteAt(context.Background(), bytes.Repeat([]byte{2}, 8192), 4096, false); err != nil {
		t.Fatal(err)
	}
	img := make([]byte, size)
	wantImage(t, context.Background(), s.ReadAt, img, frozen, "snapshot", true)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}
