package cow

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// headerFailStore is a memStore whose header cannot be written: invalidate
// fails and leaves the header saying valid, as a store whose device is gone.
type headerFailStore struct {
	*memStore
	err error
}

func (h *headerFailStore) invalidate(string) error { return h.err }

// TestRecordInvalid: when a persistent snapshot turns invalid, the owner's
// RecordInvalid is called with the reason before any origin write goes on
// without copying for it: while the hook blocks, the write that found the
// failure and a write to a cluster nobody copied both wait, and the origin
// is unchanged. Whatever the store and the hook answer, the snapshot is then
// released and the writes succeed; both failing is logged as an error
// naming both errors.
func TestRecordInvalid(t *testing.T) {
	storeErr := errors.New("store header: device gone")
	recordErr := errors.New("owner record: state dir gone")
	tests := []struct {
		name                string
		storeErr, recordErr error
	}{
		{"both recorded", nil, nil},
		{"store header fails", storeErr, nil},
		{"owner record fails", nil, recordErr},
		{"both fail", storeErr, recordErr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			const cs, size = 4096, 64 << 10
			e, origin, data := testEngine(t, vfstest.NewMemFS(), size, 3, false)
			logs := &testenv.SyncBuffer{}
			e.log = slog.New(slog.NewTextHandler(logs, nil))
			var store *memStore
			e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
				store = newMemStore(o)
				store.fail = func(int) error { return syscall.EIO }
				if tt.storeErr != nil {
					return &headerFailStore{memStore: store, err: tt.storeErr}, nil
				}
				return store, nil
			}
			type call struct{ name, reason string }
			calls := make(chan call, 4)
			proceed := make(chan struct{})
			release := sync.OnceFunc(func() { close(proceed) })
			defer release() // a failed test must not leave the writer blocked
			var s *Snapshot
			e.recordInvalid = func(name, reason string) error {
				if s.inv.released.Load() {
					t.Error("snapshot released before RecordInvalid was called")
				}
				calls <- call{name, reason}
				<-proceed
				return tt.recordErr
			}
			var err error
			s, err = e.Create(ctx, nil, SnapshotOptions{Name: "s", ClusterSize: cs})
			if err != nil {
				t.Fatal(err)
			}

			write := func(off int64) <-chan error {
				done := make(chan error, 1)
				go func() { done <- e.WriteAt(ctx, bytes.Repeat([]byte{0xee}, cs), off, false) }()
				return done
			}
			first := write(0) // its commit fails: the snapshot turns invalid
			var c call
			select {
			case c = <-calls:
			case <-time.After(10 * time.Second):
				t.Fatal("RecordInvalid not called")
			}
			info := s.Info()
			if c.name != "s" || info.Valid || c.reason != info.Reason || !strings.Contains(c.reason, "write backing store") {
				t.Fatalf("RecordInvalid(%q, %q); snapshot valid=%v reason %q", c.name, c.reason, info.Valid, info.Reason)
			}
			second := write(5 * cs) // a cluster nobody copied
			select {
			case err := <-first:
				t.Fatalf("the failing write completed (%v) while the invalidation was being recorded", err)
			case err := <-second:
				t.Fatalf("a write to an uncopied cluster completed (%v) while the invalidation was being recorded", err)
			case <-time.After(50 * time.Millisecond):
			}
			got := make([]byte, 2*cs)
			origin.ReadAt(got[:cs], 0)
			origin.ReadAt(got[cs:], 5*cs)
			if !bytes.Equal(got[:cs], data[:cs]) || !bytes.Equal(got[cs:], data[5*cs:6*cs]) {
				t.Fatal("the origin was modified before the invalidation was recorded")
			}

			release()
			for _, done := range []<-chan error{first, second} {
				if err := <-done; err != nil {
					t.Fatalf("origin write failed: %v", err)
				}
			}
			// Released: further writes go on without the hook.
			if err := <-write(9 * cs); err != nil {
				t.Fatal(err)
			}
			if n := len(calls); n != 0 {
				t.Fatalf("RecordInvalid called %d more times", n)
			}
			if err := s.ReadAt(ctx, got[:cs], 0); !errors.Is(err, ErrInvalid) || !errors.Is(err, syscall.EIO) {
				t.Fatalf("read of the invalid snapshot: %v", err)
			}
			if hdr := store.header(); hdr.Valid != (tt.storeErr != nil) {
				t.Fatalf("store header valid=%v with store error %v", hdr.Valid, tt.storeErr)
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}

			out := logs.String()
			both := strings.Contains(out, "nor in the owner's record")
			if want := tt.storeErr != nil && tt.recordErr != nil; both != want {
				t.Fatalf("error naming both failures logged=%v, want %v:\n%s", both, want, out)
			}
			if both && (!strings.Contains(out, storeErr.Error()) || !strings.Contains(out, recordErr.Error())) {
				t.Fatalf("the error does not name both failures:\n%s", out)
			}
		})
	}
}

// TestRecordInvalidTransient: a transient snapshot is never reopened, so its
// invalidation is not the owner's business and does not wait for it.
func TestRecordInvalidTransient(t *testing.T) {
	ctx := context.Background()
	e, _, _ := testEngine(t, vfstest.NewMemFS(), 64<<10, 4, false)
	e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) {
		m := newMemStore(o)
		m.fail = func(int) error { return syscall.EIO }
		return m, nil
	}
	e.recordInvalid = func(name, reason string) error {
		t.Errorf("RecordInvalid(%q, %q) called for a transient snapshot", name, reason)
		return nil
	}
	s, err := e.Create(ctx, nil, SnapshotOptions{Name: "t", ClusterSize: 4096, Transient: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if err := e.WriteAt(ctx, make([]byte, 4096), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	s.commits.waitDurable(s.commits.validSeq.Load())
	if s.Info().Valid {
		t.Fatal("transient snapshot still valid after a failed commit")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}
