package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/stallfs"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

func TestMain(m *testing.M) {
	stallfs.ServeIfAsked() // Mount's FUSE server runs in this binary
	os.Exit(m.Run())
}

// nbdWrite sends an NBD write request (simple replies: the connection was
// opened with NBD_OPT_EXPORT_NAME) without waiting for its reply.
func nbdWrite(t *testing.T, c net.Conn, cookie uint64, off int64, p []byte) {
	t.Helper()
	var h []byte
	h = binary.BigEndian.AppendUint32(h, 0x25609513) // request magic
	h = binary.BigEndian.AppendUint16(h, 0)          // flags
	h = binary.BigEndian.AppendUint16(h, 1)          // NBD_CMD_WRITE
	h = binary.BigEndian.AppendUint64(h, cookie)
	h = binary.BigEndian.AppendUint64(h, uint64(off))
	h = binary.BigEndian.AppendUint32(h, uint32(len(p)))
	if _, err := c.Write(append(h, p...)); err != nil {
		t.Fatalf("nbd write request: %v", err)
	}
}

// nbdReply reads one simple reply and returns its cookie and errno.
func nbdReply(c net.Conn) (cookie uint64, errno uint32, err error) {
	var r [16]byte
	if _, err := io.ReadFull(c, r[:]); err != nil {
		return 0, 0, err
	}
	if m := binary.BigEndian.Uint32(r[:4]); m != 0x67446698 {
		return 0, 0, errors.New("not a simple reply")
	}
	return binary.BigEndian.Uint64(r[8:]), binary.BigEndian.Uint32(r[4:8]), nil
}

// TestStopTimeoutStalledStore: the backing store of a persistent snapshot
// sits on a disk that stops answering (stallfs), and an NBD write larger
// than the snapshot's cache waits for the stuck writer. Shutdown with a
// short timeout returns within it and a small margin, with an error
// matching ErrStopForced that names the snapshot. The write is released
// once the snapshot's record says invalid, and answered; every write
// answered is on the origin. A restart lists the snapshot invalid with the
// reason and does not serve it.
func TestStopTimeoutStalledStore(t *testing.T) {
	stall := stallfs.Mount(t, t.TempDir())
	e := newEnv(t, 0)
	data := make([]byte, 32<<20)
	rand.Read(data)
	if err := os.WriteFile(e.origin, data, 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.SyncBuffer{}
	cfg := e.config()
	cfg.CacheBytes = 1 << 20 // 16 slots of 64 KiB
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	defer func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	}()
	ctx := context.Background()
	d := start(t, cfg)
	c := control.NewClient(e.ctl)
	backing := filepath.Join(stall.Dir(), "s.cow")
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: backing}); err != nil {
		t.Fatal(err)
	}
	conn := nbdConnect(t, e.sock, "unix", "data")
	defer conn.Close()
	first := bytes.Repeat([]byte{0xa1}, 1<<20)
	nbdWrite(t, conn, 1, 0, first)
	if cookie, errno, err := nbdReply(conn); err != nil || cookie != 1 || errno != 0 {
		t.Fatalf("write before the stall: cookie %d errno %d, %v", cookie, errno, err)
	}

	stall.Hold()
	second := bytes.Repeat([]byte{0xb2}, 4<<20) // 64 clusters
	nbdWrite(t, conn, 2, 8<<20, second)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		i, err := c.Snapshot(ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		if stall.Blocked() > 0 && i.Stats.CacheFullWaits > 0 {
			break // the writer is in the store, the write waits for the cache
		}
		if time.Now().After(deadline) {
			t.Fatalf("the write does not wait for the stalled store: %d writes held, %+v", stall.Blocked(), i.Stats)
		}
	}

	const timeout = 300 * time.Millisecond
	begin := time.Now()
	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- d.Shutdown(sctx) }()
	var err error
	select {
	case err = <-stopped:
	case <-time.After(timeout + exitGrace + 10*time.Second):
		t.Fatal("Shutdown did not return")
	}
	took := time.Since(begin)
	t.Logf("Shutdown with a %v timeout took %v: %v", timeout, took, err)
	if took > timeout+exitGrace {
		t.Fatalf("Shutdown took %v with a %v timeout", took, timeout)
	}
	if !errors.Is(err, ErrStopForced) || !strings.Contains(err.Error(), "snapshot(s) s invalidated ("+stoppedReason+")") {
		t.Fatalf("Shutdown: %v; want ErrStopForced naming snapshot s", err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if cookie, errno, err := nbdReply(conn); err != nil || cookie != 2 || errno != 0 {
		t.Fatalf("the released write: cookie %d errno %d, %v; want it answered", cookie, errno, err)
	}
	got, err := os.ReadFile(e.origin)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	copy(want, first)
	copy(want[8<<20:], second)
	if !bytes.Equal(got, want) {
		t.Fatal("the origin does not hold exactly the answered writes")
	}
	rec, err := d.state.read(snapFile("s"))
	if err != nil || !rec.Invalid || rec.Reason != stoppedReason {
		t.Fatalf("state record %+v, %v; want invalid for %q", rec, err, stoppedReason)
	}

	// The disk answers again. The old writer finishes and writes the
	// store's header; wait for that, so that the restart does not write the
	// header at the same time.
	stall.Resume()
	waitHeaderInvalid(t, backing)

	d2 := start(t, cfg)
	s, err := c.Snapshot(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if s.State != control.StateInvalid || s.Reason != stoppedReason || s.Served {
		t.Fatalf("after restart: state %s, reason %q, served %v; want invalid for %q, not served", s.State, s.Reason, s.Served, stoppedReason)
	}
	if err := d2.Shutdown(ctx); err != nil {
		t.Fatalf("clean shutdown after restart: %v", err)
	}
}

// waitHeaderInvalid waits until the store at path says invalid.
func waitHeaderInvalid(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		f, err := vfs.OS{}.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		h, err := backstore.Identify(f)
		f.Close()
		if err == nil && h.State == backstore.StateInvalid {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("store header %+v, %v: the writer did not record the invalidation once the disk answered", h, err)
		}
	}
}
