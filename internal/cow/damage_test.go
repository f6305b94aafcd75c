package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestDamagedCopyInvalidatesSnapshot: when the stored copy of a cluster no
// longer matches its checksum (the store file was damaged after the
// commit), a snapshot read of that cluster fails with ErrInvalid and EIO
// rather than returning wrong bytes, and the snapshot turns invalid for
// good, with a reason naming the cluster. A persistent snapshot records
// that like any other invalidation: in the store header and through
// RecordInvalid, once. Origin writes go on. Kills: the read path passing
// the checksum error up without invalidating the snapshot (it would stay
// valid, answer EIO for that cluster only, and be reopened as valid).
func TestDamagedCopyInvalidatesSnapshot(t *testing.T) {
	for _, transient := range []bool{false, true} {
		t.Run(fmt.Sprintf("transient=%v", transient), func(t *testing.T) {
			ctx := context.Background()
			const cs, size, c = 4096, 16 * 4096, 5
			fs := vfstest.NewMemFS()
			e, _, data := testEngine(t, fs, size, 6, true)
			type call struct{ name, reason string }
			calls := make(chan call, 4)
			e.recordInvalid = func(name, reason string) error {
				calls <- call{name, reason}
				return nil
			}
			s, err := e.Create(ctx, mustOpen(t, fs, "store"), SnapshotOptions{Name: "s", ClusterSize: cs, Transient: transient, OriginID: "o"})
			if err != nil {
				t.Fatal(err)
			}
			// Cluster c is copied and committed (the only cluster of the
			// store: data slot 0), and has left the cache.
			if err := e.WriteAt(ctx, bytes.Repeat([]byte{0xEE}, cs), c*cs, false); err != nil {
				t.Fatal(err)
			}
			s.commits.waitDurable(s.commits.validSeq.Load())
			p := make([]byte, cs)
			if err := s.ReadAt(ctx, p, c*cs); err != nil || !bytes.Equal(p, data[c*cs:(c+1)*cs]) {
				t.Fatalf("read of the intact copy: %v", err)
			}
			if n := s.Info().Stats.MapReads; n != 1 {
				t.Fatalf("the read found the copy in the cache (%d store reads), not the store", n)
			}

			// Damage the copy: one byte of its data slot, through another
			// handle (a stray write).
			f, err := fs.OpenFile("store", os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			h, err := backstore.Identify(f)
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 1)
			if _, err := f.ReadAt(b, h.DataStart+100); err != nil {
				t.Fatal(err)
			}
			b[0] ^= 0x40
			if _, err := f.WriteAt(b, h.DataStart+100); err != nil {
				t.Fatal(err)
			}

			err = s.ReadAt(ctx, p, c*cs)
			if !errors.Is(err, ErrInvalid) || !errors.Is(err, syscall.EIO) {
				t.Fatalf("read of the damaged copy: %v, want ErrInvalid and EIO", err)
			}
			info := s.Info()
			if info.Valid || !strings.Contains(info.Reason, fmt.Sprintf("cluster %d ", c)) {
				t.Fatalf("after reading a damaged copy: valid %v, reason %q (want one naming cluster %d)", info.Valid, info.Reason, c)
			}
			// Every later read fails, also of clusters never copied.
			if err := s.ReadAt(ctx, p, 0); !errors.Is(err, ErrInvalid) {
				t.Fatalf("read of an uncopied cluster of the invalid snapshot: %v", err)
			}

			if !transient {
				select {
				case got := <-calls:
					if got.name != "s" || got.reason != info.Reason {
						t.Fatalf("RecordInvalid(%q, %q), want (%q, %q)", got.name, got.reason, "s", info.Reason)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("RecordInvalid not called")
				}
				// The hook runs after the header was written.
				if h, err := backstore.Identify(f); err != nil || h.State != backstore.StateInvalid || h.Reason != info.Reason {
					t.Fatalf("store header: state %v reason %q (%v), want invalid with %q", h.State, h.Reason, err, info.Reason)
				}
			}
			// Origin writes go on: to the damaged cluster and to one
			// never copied.
			for _, off := range []int64{c * cs, 9 * cs} {
				if err := await(t, writeAsync(e, bytes.Repeat([]byte{0xDD}, cs), off), "an origin write"); err != nil {
					t.Fatalf("origin write at %d after the damage: %v", off, err)
				}
			}
			want := bytes.Clone(data)
			copy(want[c*cs:], bytes.Repeat([]byte{0xDD}, cs))
			copy(want[9*cs:], bytes.Repeat([]byte{0xDD}, cs))
			img := make([]byte, size)
			wantImage(t, ctx, e.ReadAt, img, want, "origin", true)
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if n := len(calls); n != 0 {
				t.Fatalf("RecordInvalid called %d more times", n)
			}
			f.Close()
		})
	}
}
