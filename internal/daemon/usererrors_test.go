package daemon

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// nbdZero sends NBD_CMD_WRITE_ZEROES with flags and returns the reply's
// errno (simple replies: the connection came from nbdConnect).
func nbdZero(t *testing.T, c net.Conn, flags uint16, off int64, n uint32) uint32 {
	t.Helper()
	var h []byte
	h = binary.BigEndian.AppendUint32(h, 0x25609513)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, 6) // NBD_CMD_WRITE_ZEROES
	h = binary.BigEndian.AppendUint64(h, 77)
	h = binary.BigEndian.AppendUint64(h, uint64(off))
	h = binary.BigEndian.AppendUint32(h, n)
	if _, err := c.Write(h); err != nil {
		t.Fatal(err)
	}
	cookie, errno, err := nbdReply(c)
	if err != nil || cookie != 77 {
		t.Fatalf("write zeroes reply: cookie %d, %v", cookie, err)
	}
	return errno
}

// TestFastZero: a fast zero of the origin succeeds while no snapshot
// exists (the range reads back as zeros), and is refused with ENOTSUP,
// changing nothing, while a snapshot would need the old data copied first;
// a plain zero then still works and the snapshot keeps the old data.
func TestFastZero(t *testing.T) {
	const flagFastZero = 1 << 4
	e := newEnv(t, 0)
	data := bytes.Repeat([]byte("nbdsnap!"), (1<<20)/8)
	if err := os.WriteFile(e.origin, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d := start(t, e.config())
	ctx := context.Background()
	conn := nbdConnect(t, e.sock, "unix", "data")
	defer conn.Close()
	if errno := nbdZero(t, conn, flagFastZero, 64<<10, 64<<10); errno != 0 {
		t.Fatalf("fast zero without a snapshot: errno %d", errno)
	}
	got := make([]byte, len(data))
	if err := d.engine.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[64<<10 : 128<<10])
	if !bytes.Equal(got, want) {
		t.Fatal("fast zero did not zero exactly its range")
	}

	c := control.NewClient(e.ctl)
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "s1.cow")}); err != nil {
		t.Fatal(err)
	}
	if errno := nbdZero(t, conn, flagFastZero, 256<<10, 64<<10); errno != uint32(syscall.ENOTSUP) {
		t.Fatalf("fast zero under a snapshot: errno %d, want ENOTSUP (%d)", errno, syscall.ENOTSUP)
	}
	if err := d.engine.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("a refused fast zero changed the origin (%v)", err)
	}
	if errno := nbdZero(t, conn, 0, 256<<10, 64<<10); errno != 0 {
		t.Fatalf("zero under a snapshot: errno %d", errno)
	}
	snap, _ := d.engine.Snapshot("s1")
	if err := snap.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the snapshot lost the old data (%v)", err)
	}
}

// TestResizedOriginSaysSo: a persistent snapshot whose origin file was
// resized while the daemon was down is listed invalid with both sizes,
// not as "another origin".
func TestResizedOriginSaysSo(t *testing.T) {
	e := newEnv(t, 4<<20)
	ctx := context.Background()
	d := start(t, e.config())
	c := control.NewClient(e.ctl)
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "s1.cow")}); err != nil {
		t.Fatal(err)
	}
	if err := d.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(e.origin, 8<<20); err != nil {
		t.Fatal(err)
	}
	start(t, e.config())
	s, err := c.Snapshot(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	want := "the origin at " + e.origin + " is the file this snapshot was taken of, but its size changed from 4194304 to 8388608 bytes since (a snapshot cannot follow a resized origin)"
	if s.State != control.StateInvalid || s.Served || s.Reason != want {
		t.Fatalf("got %s served=%v %q, want invalid %q", s.State, s.Served, s.Reason, want)
	}
}

// TestBackingNotAFile: a backing path that names something other than a
// regular file or a block device is refused saying what it is.
func TestBackingNotAFile(t *testing.T) {
	e := newEnv(t, 1<<20)
	start(t, e.config())
	c := control.NewClient(e.ctl)
	fifo := filepath.Join(e.dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(e.dir, "subdir")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/dev/null": "backing path /dev/null is a character device, not a file or block device",
		fifo:        "backing path " + fifo + " is a named pipe, not a file or block device",
		dir:         "backing path " + dir + " is a directory, not a file or block device",
	} {
		_, err := c.Create(context.Background(), control.CreateRequest{Name: "s1", BackingPath: path})
		if err == nil || err.Error() != want || !errors.Is(err, control.ErrInvalid) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
}

// TestClusterSizeRaised: a 1 TiB origin cannot have 4 KiB clusters (at
// most 2^24 of them): the snapshot gets 64 KiB, and the daemon says so.
func TestClusterSizeRaised(t *testing.T) {
	e := newEnv(t, 1<<40)
	var logs bytes.Buffer
	cfg := e.config()
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	start(t, cfg)
	c := control.NewClient(e.ctl)
	info, err := c.Create(context.Background(), control.CreateRequest{Name: "s1", BackingPath: filepath.Join(e.dir, "s1.cow"),
		ClusterSize: 4096, Transient: true})
	if err != nil {
		t.Fatal(err)
	}
	if info.ClusterSize != 64<<10 {
		t.Fatalf("cluster size %d, want 64 KiB", info.ClusterSize)
	}
	want := `level=WARN msg="cluster size raised: the origin is too large for the size asked (at most 16 Mi clusters)" snapshot=s1 asked=4096 cluster_size=65536 origin_size=1099511627776`
	if !strings.Contains(logs.String(), want) {
		t.Fatalf("log lacks %q:\n%s", want, logs.String())
	}
}

// TestOriginOver16TiB: an origin over 16 TiB is served, but a create is
// refused naming the limit, before anything is touched. ext4 files stop
// at 16 TiB, so the sparse origin lives on a tmpfs (which needs root).
func TestOriginOver16TiB(t *testing.T) {
	testenv.RequireRoot(t)
	e := newEnv(t, 0)
	tmp := t.TempDir()
	mountTmpfs(t, tmp, "size=16m")
	e.origin = filepath.Join(tmp, "origin.img")
	if err := os.WriteFile(e.origin, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(e.origin, 17<<40); err != nil {
		t.Fatal(err)
	}
	start(t, e.config())
	backing := filepath.Join(e.dir, "s1.cow")
	_, err := control.NewClient(e.ctl).Create(context.Background(), control.CreateRequest{Name: "s1", BackingPath: backing})
	want := "origin " + e.origin + " is 18691697672192 bytes, over 16 TiB (17592186044416 bytes): no snapshot can cover it (at most 16777216 clusters of at most 1 MiB)"
	if err == nil || err.Error() != want || !errors.Is(err, control.ErrInvalid) {
		t.Fatalf("got %v, want %q", err, want)
	}
	if _, err := os.Stat(backing); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("backing file after a refused create: %v", err)
	}
}
