package daemon

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// rbSetup starts a daemon on a 4 MiB origin of random data (fixed seed,
// logged), creates snapshot s1 with 16 KiB clusters and overwrites 1 MiB
// of the origin (64 clusters for s1 to copy). It returns the daemon, its
// environment and s1's image.
func rbSetup(t *testing.T, seed uint64) (*Daemon, env, []byte) {
	t.Helper()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0x7b))
	e := newEnv(t, 0)
	img := make([]byte, 4<<20)
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(e.origin, img, 0o600); err != nil {
		t.Fatal(err)
	}
	d := start(t, e.config())
	c := control.NewClient(e.ctl)
	if _, err := c.Create(context.Background(), control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "s1.cow"), ClusterSize: 16 << 10}); err != nil {
		t.Fatal(err)
	}
	fill(t, d, 0x5a, 1<<20, 1<<20)
	return d, e, img
}

// rbOrigin reads the origin file whole.
func rbOrigin(t *testing.T, e env) []byte {
	t.Helper()
	b, err := os.ReadFile(e.origin)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rbNoFile fails the test if path exists.
func rbNoFile(t *testing.T, path, when string) {
	t.Helper()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s: %s exists (%v)", when, path, err)
	}
}

// TestRollbackStatus: the rollback's answer and Status describe it
// running (with its progress file in the state directory), and Status,
// asked in a tight loop, shows it at every moment until it is done (also
// while the daemon finishes it: the progress file removed, s1 cleared with
// consume), remaining never increasing; then done, with the origin file
// holding s1's image and the progress file gone.
func TestRollbackStatus(t *testing.T) {
	for _, consume := range []bool{false, true} {
		t.Run(map[bool]string{false: "keep", true: "consume"}[consume], func(t *testing.T) {
			d, e, img := rbSetup(t, 1)
			ctx := context.Background()
			c := control.NewClient(e.ctl)
			st, err := c.Rollback(ctx, "s1", control.RollbackRequest{Consume: consume, Rate: 2 << 20})
			if err != nil {
				t.Fatal(err)
			}
			if st.Snapshot != "s1" || st.State != control.RollbackRunning || st.TotalBytes != 1<<20 ||
				st.RemainingBytes <= 0 || st.Consume != consume || st.Rate != 2<<20 || st.UUID == "" {
				t.Fatalf("rollback answered %+v", st)
			}
			if _, err := os.Stat(d.progressPath()); err != nil {
				t.Fatalf("no progress file while the rollback runs: %v", err)
			}
			polls, last := 0, st.RemainingBytes
			for deadline := time.Now().Add(10 * time.Second); ; polls++ {
				now, err := d.Status(ctx)
				if err != nil {
					t.Fatal(err)
				}
				rb := now.Rollback
				if rb == nil || rb.UUID != st.UUID || !rb.Started.Equal(st.Started) {
					t.Fatalf("poll %d: status shows rollback %+v, %d bytes left at the poll before; want the rollback to s1 until it is done", polls, rb, last)
				}
				if rb.RemainingBytes > last {
					t.Fatalf("poll %d: remaining went up from %d to %d", polls, last, rb.RemainingBytes)
				}
				last = rb.RemainingBytes
				if rb.State == control.RollbackDone {
					if rb.RemainingBytes != 0 || rb.Finished.IsZero() || rb.TotalBytes != 1<<20 {
						t.Fatalf("done: %+v", rb)
					}
					break
				}
				if rb.State != control.RollbackRunning || rb.Error != "" {
					t.Fatalf("poll %d: %+v", polls, rb)
				}
				if time.Now().After(deadline) {
					t.Fatalf("not done after 10s: %+v", rb)
				}
			}
			t.Logf("%d status polls", polls)
			if !bytes.Equal(rbOrigin(t, e), img) {
				t.Fatal("origin file after the rollback is not s1's image")
			}
			rbNoFile(t, d.progressPath(), "after the rollback")
			_, err = c.Snapshot(ctx, "s1")
			if consume {
				if !errors.Is(err, control.ErrNotFound) {
					t.Fatalf("s1 after a rollback with consume: %v", err)
				}
				rbNoFile(t, filepath.Join(e.dir, "s1.cow"), "after a rollback with consume")
			} else if err != nil {
				t.Fatalf("s1 after the rollback: %v", err)
			}
			// Snapshots can be created again.
			if _, err := c.Create(ctx, control.CreateRequest{Name: "s2", BackingPath: filepath.Join(e.dir, "s2.cow")}); err != nil {
				t.Fatalf("create after the rollback: %v", err)
			}
		})
	}
}

// TestRollbackUncommittedProgress: a progress file holding no committed
// rollback (empty, or a header of zeros: a crash before the rollback
// instant) found at start is removed, and no rollback runs: the origin and
// s1 are as they were, and snapshots can be created.
func TestRollbackUncommittedProgress(t *testing.T) {
	for name, content := range map[string][]byte{"empty": nil, "zeros": make([]byte, 4096), "zeros+bitmap": make([]byte, 4096+32)} {
		t.Run(name, func(t *testing.T) {
			d, e, img := rbSetup(t, 2)
			ctx := context.Background()
			if err := d.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			origin := rbOrigin(t, e)
			if bytes.Equal(origin, img) {
				t.Fatal("the origin was not written")
			}
			path := filepath.Join(e.state, progressFile)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}

			d = start(t, e.config())
			rbNoFile(t, path, "after the start")
			c := control.NewClient(e.ctl)
			st, err := c.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Rollback != nil {
				t.Fatalf("status shows a rollback: %+v", st.Rollback)
			}
			if _, ok := d.engine.RollbackInfo(); ok {
				t.Fatal("the engine has a rollback")
			}
			if !bytes.Equal(rbOrigin(t, e), origin) {
				t.Fatal("the origin changed")
			}
			s1, err := c.Snapshot(ctx, "s1")
			if err != nil || s1.State != control.StateValid || !s1.Served {
				t.Fatalf("s1: %+v, %v", s1, err)
			}
			if _, err := c.Create(ctx, control.CreateRequest{Name: "s2", BackingPath: filepath.Join(e.dir, "s2.cow")}); err != nil {
				t.Fatalf("create: %v", err)
			}
		})
	}
}

// rbCompleteProgress writes, in the state directory, the progress file of
// a rollback to the snapshot whose store is at path, every cluster of the
// store marked restored (what a crash after the copy's last checkpoint
// leaves), as backstore's own CreateProgress, Mark and Sync make it.
func rbCompleteProgress(t *testing.T, e env, path string, originSize int64, consume bool) {
	t.Helper()
	sf, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	svf, err := vfs.NewOSFile(sf)
	if err != nil {
		t.Fatal(err)
	}
	st, err := backstore.Open(svf, nil)
	if err != nil {
		t.Fatal(err)
	}
	var copied []uint32
	st.ForEachCopied(func(c uint32) { copied = append(copied, c) })
	h := st.Header()
	if len(copied) != st.CopiedCount() || len(copied) == 0 {
		t.Fatalf("store: %d clusters visited, %d copied", len(copied), st.CopiedCount())
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	pf, err := os.OpenFile(filepath.Join(e.state, progressFile), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	pvf, err := vfs.NewOSFile(pf)
	if err != nil {
		t.Fatal(err)
	}
	p, err := backstore.CreateProgress(pvf, backstore.ProgressInfo{UUID: h.UUID, ClusterSize: h.ClusterSize, OriginSize: originSize,
		Entries: uint32(len(copied)), Started: time.Now(), Consume: consume})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range copied {
		p.Mark(c)
	}
	if err := p.Sync(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if !p.Complete() {
		t.Fatalf("progress of %d marks is not complete", p.Done())
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRollbackCompleteProgressAtStart: a complete progress file found at
// start (a crash after the copy was complete and recorded, before the
// file was removed) is finished before the origin is served: the file is
// removed, nothing is copied, and with consume s1 is cleared (its record
// and store gone); without, s1 is served valid with its image.
func TestRollbackCompleteProgressAtStart(t *testing.T) {
	for _, consume := range []bool{false, true} {
		t.Run(map[bool]string{false: "keep", true: "consume"}[consume], func(t *testing.T) {
			d, e, img := rbSetup(t, 3)
			ctx := context.Background()
			store := filepath.Join(e.dir, "s1.cow")
			if err := d.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			origin := rbOrigin(t, e)
			rbCompleteProgress(t, e, store, int64(len(origin)), consume)

			d = start(t, e.config())
			rbNoFile(t, d.progressPath(), "after the start")
			if _, ok := d.engine.RollbackInfo(); ok {
				t.Fatal("the engine has a rollback")
			}
			if !bytes.Equal(rbOrigin(t, e), origin) {
				t.Fatal("finishing a complete rollback changed the origin")
			}
			c := control.NewClient(e.ctl)
			st, err := c.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Rollback != nil && st.Rollback.State != control.RollbackDone {
				t.Fatalf("status shows rollback %+v", st.Rollback)
			}
			s1, err := c.Snapshot(ctx, "s1")
			if consume {
				if !errors.Is(err, control.ErrNotFound) {
					t.Fatalf("s1 after finishing a rollback with consume: %+v, %v", s1, err)
				}
				rbNoFile(t, store, "after finishing a rollback with consume")
				rbNoFile(t, filepath.Join(e.state, "snap-s1.json"), "after finishing a rollback with consume")
			} else {
				if err != nil || s1.State != control.StateValid || !s1.Served {
					t.Fatalf("s1: %+v, %v", s1, err)
				}
				snap, ok := d.engine.Snapshot("s1")
				if !ok {
					t.Fatal("s1 not open")
				}
				got := make([]byte, len(img))
				if err := snap.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, img) {
					t.Fatalf("s1 does not read its image (%v)", err)
				}
			}
			if _, err := c.Create(ctx, control.CreateRequest{Name: "s2", BackingPath: filepath.Join(e.dir, "s2.cow")}); err != nil {
				t.Fatalf("create: %v", err)
			}
		})
	}
}

// rbWaitDone polls Status until the rollback is done.
func rbWaitDone(t *testing.T, d *Daemon) control.RollbackStatus {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st, err := d.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.Rollback == nil || st.Rollback.State == control.RollbackFailed {
			t.Fatalf("rollback status %+v", st.Rollback)
		}
		if st.Rollback.State == control.RollbackDone {
			return *st.Rollback
		}
		if time.Now().After(deadline) {
			t.Fatalf("rollback not done after 10s: %+v", st.Rollback)
		}
	}
}

// TestRollbackSourceMissingAtStart: a daemon stopped during a rollback
// whose source's store is missing at the next start does not start, with
// one line naming the rollback, the snapshot and the store's path, and
// records nothing: s1's record does not say invalid (the origin was not
// served without it). The store back, the start resumes the rollback,
// which completes; s1 is valid, also after one more restart.
func TestRollbackSourceMissingAtStart(t *testing.T) {
	d, e, img := rbSetup(t, 4)
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	if _, err := c.Rollback(ctx, "s1", control.RollbackRequest{Rate: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.state, progressFile)); err != nil {
		t.Fatalf("no progress file after a stop during the rollback: %v", err)
	}
	store, aside := filepath.Join(e.dir, "s1.cow"), filepath.Join(e.dir, "aside.cow")
	if err := os.Rename(store, aside); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(e.state, "snap-s1.json")
	before, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	d, err = Start(ctx, e.config())
	if err == nil {
		d.Shutdown(ctx)
		t.Fatal("the daemon started without its rollback's source")
	}
	msg := err.Error()
	for _, want := range []string{"rollback to snapshot s1", store, "not served"} {
		if !strings.Contains(msg, want) || strings.Contains(msg, "\n") {
			t.Fatalf("start error %q; want one line containing %q", msg, want)
		}
	}
	if after, err := os.ReadFile(record); err != nil || !bytes.Equal(after, before) {
		t.Fatalf("the refused start changed s1's record (%v):\n%s\nwas:\n%s", err, after, before)
	}

	if err := os.Rename(aside, store); err != nil {
		t.Fatal(err)
	}
	d = start(t, e.config())
	rbWaitDone(t, d)
	if !bytes.Equal(rbOrigin(t, e), img) {
		t.Fatal("origin file after the resumed rollback is not s1's image")
	}
	for range 2 {
		s1, err := c.Snapshot(ctx, "s1")
		if err != nil || s1.State != control.StateValid || !s1.Served {
			t.Fatalf("s1: %+v, %v", s1, err)
		}
		if err := d.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		d = start(t, e.config())
	}
}
