package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"
)

const (
	nbd0      = "/dev/nbd0"
	nbd1      = "/dev/nbd1"
	originMnt = "/mnt/origin"
	snapMnt   = "/mnt/snap"
	// Timeout (seconds) after which the kernel requeues a request that got
	// no reply. Only the crash scenarios set it: there it bounds how long
	// requests in flight at the kill wait before being resent on the new
	// connection. A request this slow with the server alive would be
	// requeued too and then wait for a reconnection nobody makes; requests
	// here take milliseconds, so 8 s leaves a wide margin on a loaded host.
	requeueTimeout = "8"
	// How long the kernel holds I/O for a dead connection (seconds).
	deadConnTimeout = 120
)

func sleepCtx(ctx context.Context, ms int) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Duration(ms) * time.Millisecond):
		return nil
	}
}

// originUp starts the daemon on a fresh origin image, attaches the proxy
// export as /dev/nbd0 over the unix socket (extra: more nbd-client flags),
// makes ext4 on it and mounts it.
func (g *guest) originUp(ctx context.Context, extra ...string) (*proc, error) {
	return g.originUpWith(ctx, nil, func() error { return g.attach(ctx, nbd0, serveSock, exportName, extra...) })
}

// originUpWith is originUp with more `nbdsnap serve` flags and its own way
// of attaching /dev/nbd0 (the tls scenario's: over TCP with TLS).
func (g *guest) originUpWith(ctx context.Context, serveFlags []string, attach func() error) (*proc, error) {
	var d *proc
	err := g.step("serve", func() (err error) {
		if err := createOrigin(); err != nil {
			return err
		}
		d, err = g.serve(ctx, serveFlags...)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := g.step("attach origin", attach); err != nil {
		return nil, err
	}
	if err := g.step("mkfs.ext4 + mount", func() error {
		if err := g.mkfs(ctx, nbd0); err != nil {
			return err
		}
		return g.mount(ctx, nbd0, originMnt, "rw")
	}); err != nil {
		return nil, err
	}
	return d, nil
}

// originDown checks the origin after a scenario: its tree equals the model,
// and once unmounted e2fsck -fn finds it clean.
func (g *guest) originDown(ctx context.Context, model fsModel) error {
	if err := g.step("origin holds what was written", func() error {
		return checkTree(originMnt, model)
	}); err != nil {
		return err
	}
	return g.step("umount origin + e2fsck -fn", func() error {
		if err := g.umount(ctx, originMnt); err != nil {
			return err
		}
		return g.fsckClean(ctx, nbd0)
	})
}

// finish detaches the devices, clears the snapshots (which the daemon
// refuses while a client has them open) and stops the daemon, which must
// exit 0 on SIGTERM.
func (g *guest) finish(ctx context.Context, d *proc, snaps ...string) error {
	return g.step("detach + clear + stop", func() error {
		for _, dev := range []string{nbd1, nbd0} {
			if err := g.detach(ctx, dev); err != nil {
				return err
			}
		}
		for _, s := range snaps {
			if _, err := g.nbdsnap(ctx, "clear", s); err != nil {
				return err
			}
		}
		return d.stop(ctx)
	})
}

// setA writes file set A on the mounted origin and syncs.
func (g *guest) setA(ctx context.Context, files int) (fsModel, error) {
	a := fsModel{}
	err := g.step("write set A", func() error {
		if err := writeSet(originMnt, "A", files, 1, a); err != nil {
			return err
		}
		syscall.Sync()
		g.log.Info("set A", "files", len(a), "bytes", a.bytes())
		return nil
	})
	return a, err
}

// setAFrozen writes file set A (files files) on the mounted origin and
// takes snap1 of it with create --freeze.
func (g *guest) setAFrozen(ctx context.Context, files int) (fsModel, error) {
	a, err := g.setA(ctx, files)
	if err != nil {
		return nil, err
	}
	err = g.step("create --freeze", func() error { return g.createSnap1(ctx, "--freeze", originMnt) })
	return a, err
}

// setB changes the origin after the create instant: new files (set B),
// deletions, in-place overwrites and appends to set A. It returns the
// origin's new model.
func (g *guest) setB(ctx context.Context, a fsModel) (fsModel, error) {
	m := a.clone()
	err := g.step("write set B, delete/overwrite/append A", func() error {
		if err := writeSet(originMnt, "B", 16, 2, m); err != nil {
			return err
		}
		if err := mutate(originMnt, "A", 3, m); err != nil {
			return err
		}
		syscall.Sync()
		return nil
	})
	return m, err
}

// scenarioFreeze is scenario 1: create --freeze under a mounted ext4.
func scenarioFreeze(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setAFrozen(ctx, 32)
	if err != nil {
		return err
	}
	origin, err := g.setB(ctx, a)
	if err != nil {
		return err
	}
	if err := g.step("attach snapshot -readonly", func() error {
		return g.attach(ctx, nbd1, serveSock, "snap1", "-readonly")
	}); err != nil {
		return err
	}
	if err := g.snapshotIsSetA(ctx, a); err != nil {
		return err
	}
	if err := g.step("status: valid, clusters copied", func() error {
		st, err := g.requireValid(ctx, "snap1")
		if err == nil && st.ClustersCopied == 0 {
			err = errors.New("no cluster copied although set B overwrote set A")
		}
		return err
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, origin); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	return g.finish(ctx, d, "snap1")
}

// snapshotIsSetA checks the snapshot attached as nbd1: e2fsck -fn finds it
// clean, and mounted read-only it holds file set A exactly.
func (g *guest) snapshotIsSetA(ctx context.Context, a fsModel) error {
	if err := g.step("e2fsck -fn snapshot", func() error { return g.fsckClean(ctx, nbd1) }); err != nil {
		return err
	}
	return g.step("mount snapshot ro, compare with set A", func() error {
		if err := g.mount(ctx, nbd1, snapMnt, "ro"); err != nil {
			return err
		}
		if err := checkTree(snapMnt, a); err != nil {
			return err
		}
		return g.umount(ctx, snapMnt)
	})
}

// e2fsckJournalOnly accepts e2fsck -n output on a file system captured
// while mounted (not frozen) that says no more than what such a capture of
// a healthy ext4 always shows: journal recovery skipped, and the
// superblock's file-system-wide free block and inode totals out of date
// (ext4 keeps the true counts per group, journaled, and refreshes the
// superblock's sums only at unmount or freeze). Any other line (a pass
// reporting a problem, a per-group count, a question about an inode) is a
// finding.
func e2fsckJournalOnly(out string, code int) error {
	allowed := []string{
		"e2fsck ",
		"Warning: skipping journal recovery because doing a read-only filesystem check.",
		"Pass 1: Checking inodes, blocks, and sizes",
		"Pass 2: Checking directory structure",
		"Pass 3: Checking directory connectivity",
		"Pass 4: Checking reference counts",
		"Pass 5: Checking group summary information",
		"Free blocks count wrong (",
		"Free inodes count wrong (",
		"Fix? no",
	}
	var bad []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		ok := strings.HasPrefix(line, "/dev/nbd") && strings.Contains(line, " files (")
		for _, a := range allowed {
			if strings.HasPrefix(line, a) {
				ok = true
			}
		}
		if !ok {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 || code >= 8 {
		return fmt.Errorf("e2fsck -n exit status %d, reports more than journal notices:\n%s", code, strings.Join(bad, "\n"))
	}
	return nil
}

// scenarioNoFreeze is scenario 2: sync + create, no freeze.
func scenarioNoFreeze(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("sync + create (no freeze)", func() error {
		syscall.Sync()
		return g.createSnap1(ctx)
	}); err != nil {
		return err
	}
	origin, err := g.setB(ctx, a)
	if err != nil {
		return err
	}
	if err := g.step("attach snapshot -readonly", func() error {
		return g.attach(ctx, nbd1, serveSock, "snap1", "-readonly")
	}); err != nil {
		return err
	}
	if err := g.step("e2fsck -n snapshot: journal notices only", func() error {
		out, code, err := g.runCode(ctx, "e2fsck", "-fn", nbd1)
		if err != nil {
			return err
		}
		g.log.Info("e2fsck -fn snapshot", "exit", code, "output", out)
		return e2fsckJournalOnly(out, code)
	}); err != nil {
		return err
	}
	if err := g.step("mount snapshot ro,noload, compare with set A", func() error {
		if err := g.mount(ctx, nbd1, snapMnt, "ro,noload"); err != nil {
			return err
		}
		if err := checkTree(snapMnt, a); err != nil {
			return err
		}
		return g.umount(ctx, snapMnt)
	}); err != nil {
		return err
	}
	if err := g.step("status: valid", func() error { _, err := g.requireValid(ctx, "snap1"); return err }); err != nil {
		return err
	}
	if err := g.originDown(ctx, origin); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	return g.finish(ctx, d, "snap1")
}

// reconnect negotiates a new connection to export on sock and gives it to
// the kernel for dev, which resends on it what the dead one left pending.
func (g *guest) reconnect(ctx context.Context, dev, sock, export string) error {
	idx, err := devIndex(dev)
	if err != nil {
		return err
	}
	var c *nbdConn
	for {
		c, err = dialNBD(sock, export)
		if err == nil {
			break
		}
		if err := sleepCtx(ctx, 50); err != nil {
			return fmt.Errorf("connect %s: %w", sock, err)
		}
	}
	defer c.c.Close()
	if c.size != originSize {
		return fmt.Errorf("export %q is %d bytes after the restart, was %d", export, c.size, originSize)
	}
	f, err := c.file()
	if err != nil {
		return err
	}
	defer f.Close()
	return nbdReconfigure(idx, 0, f)
}

// holdIO makes the kernel hold a device's I/O for deadConnTimeout seconds
// when its connection dies, instead of failing it.
func holdIO(dev string) error {
	idx, err := devIndex(dev)
	if err != nil {
		return err
	}
	return nbdReconfigure(idx, deadConnTimeout, nil)
}

// copySparse copies a file, leaving holes where a 64 KiB chunk is zero.
func copySparse(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	zero := make([]byte, len(buf))
	var off int64
	for {
		n, err := io.ReadFull(in, buf)
		if n > 0 && !bytes.Equal(buf[:n], zero[:n]) {
			if _, werr := out.WriteAt(buf[:n], off); werr != nil {
				out.Close()
				return werr
			}
		}
		off += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			out.Close()
			return err
		}
	}
	if err := out.Truncate(off); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// compareDevice requires a block device to hold exactly a reference file's
// bytes, naming the first differing 4 KiB block otherwise.
func compareDevice(dev, ref string) error {
	d, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer d.Close()
	r, err := os.Open(ref)
	if err != nil {
		return err
	}
	defer r.Close()
	a := make([]byte, 1<<20)
	b := make([]byte, 1<<20)
	var off int64
	for {
		na, errA := io.ReadFull(d, a)
		nb, errB := io.ReadFull(r, b)
		if na != nb {
			return fmt.Errorf("%s and %s differ in length near offset %d (%d vs %d bytes read: %v, %v)", dev, ref, off, na, nb, errA, errB)
		}
		if !bytes.Equal(a[:na], b[:nb]) {
			for i := 0; i < na; i += 4096 {
				e := min(i+4096, na)
				if !bytes.Equal(a[i:e], b[i:e]) {
					return fmt.Errorf("%s differs from the create-instant image at offset %d (4 KiB block %d)", dev, off+int64(i), (off+int64(i))/4096)
				}
			}
		}
		off += int64(na)
		if errA == io.EOF || errA == io.ErrUnexpectedEOF {
			return nil
		}
		if errA != nil {
			return errA
		}
	}
}

// createInstantImage is the origin image as it was at snap1's create
// instant, kept by createSnap1Unmounted.
const createInstantImage = "/work/create-instant.img"

// createSnap1Unmounted unmounts the origin's file system, keeps a copy of
// the origin image in createInstantImage, creates snap1 (a persistent
// snapshot) on a backing store and mounts the file system again. With the
// file system unmounted nothing writes, so the copy is exactly what the
// snapshot must keep.
func (g *guest) createSnap1Unmounted(ctx context.Context, backing string) error {
	if err := g.umount(ctx, originMnt); err != nil {
		return err
	}
	if err := copySparse(originImage, createInstantImage); err != nil {
		return err
	}
	if _, err := g.nbdsnap(ctx, "create", "snap1", "--backing", backing); err != nil {
		return err
	}
	return g.mount(ctx, nbd0, originMnt, "rw")
}

// crashUnderLoad runs the write load on the mounted origin, kills the server
// with SIGKILL while writes are in flight, restarts it and reconnects
// /dev/nbd0; the load must then go on for a while more and end without a
// single failed write.
func (g *guest) crashUnderLoad(ctx context.Context, model fsModel, kill func() error, restart func() error, sock, export string) error {
	load := startLoad(ctx, originMnt, model, 4)
	if err := g.step("write load running", func() error { return load.waitIters(ctx, 6) }); err != nil {
		load.finish(ctx)
		return err
	}
	if err := g.step("kill -9 server with writes in flight", func() error {
		n, err := waitInflightWrites(ctx, nbd0)
		if err != nil {
			return err
		}
		if err := kill(); err != nil {
			return err
		}
		g.log.Info("killed the server", "writes_in_flight", n, "load_iterations", load.iters.Load())
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("restart server", restart); err != nil {
		return err
	}
	if err := g.step("reconnect /dev/nbd0", func() error { return g.reconnect(ctx, nbd0, sock, export) }); err != nil {
		return err
	}
	return g.step("write load goes on and ends without an error", func() error {
		if err := load.waitIters(ctx, load.iters.Load()+12); err != nil {
			return err
		}
		if err := load.finish(ctx); err != nil {
			return err
		}
		syscall.Sync()
		g.log.Info("load", "iterations", load.iters.Load())
		return nil
	})
}

// waitInflightWrites waits until the block layer has writes to a device in
// flight (/sys/block/nbdN/inflight: reads, writes) and returns their count,
// so that a kill lands while the server owes replies, the case the
// reconnection must survive.
func waitInflightWrites(ctx context.Context, dev string) (int, error) {
	p := "/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/inflight"
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(p)
		if err != nil {
			return 0, err
		}
		var reads, writes int
		if _, err := fmt.Sscan(string(b), &reads, &writes); err != nil {
			return 0, fmt.Errorf("%s: %q: %w", p, b, err)
		}
		if writes > 0 {
			return writes, nil
		}
		if err := sleepCtx(ctx, 1); err != nil {
			return 0, err
		}
	}
	return 0, fmt.Errorf("no write in flight on %s for 20s although the load runs", dev)
}

// startNbdkit serves an image file with nbdkit on a unix socket, any export
// name, and waits until it accepts connections.
func (g *guest) startNbdkit(ctx context.Context, sock, image, pidFile string) (*proc, error) {
	os.Remove(sock) // nbdkit refuses a stale socket
	os.Remove(pidFile)
	// nbdkit writes its pid file once it accepts connections.
	srv, err := g.start("nbdkit", nil, "nbdkit", "-f", "-U", sock, "-P", pidFile, "file", image)
	if err != nil {
		return nil, err
	}
	for {
		if _, err := os.Stat(pidFile); err == nil {
			return srv, nil
		}
		if srv.exited() {
			return nil, fmt.Errorf("nbdkit exited: %v", srv.err)
		}
		if err := sleepCtx(ctx, 20); err != nil {
			srv.kill()
			return nil, err
		}
	}
}

// scenarioReference proves the harness on nbdkit: attach, ext4, a write
// load across a kill -9 of the server and the reconnection, e2fsck clean.
func scenarioReference(ctx context.Context, g *guest) error {
	const sock, image, pidFile = "/run/nbdkit.sock", "/work/ref.img", "/run/nbdkit.pid"
	var srv *proc
	startNbdkit := func() (err error) {
		srv, err = g.startNbdkit(ctx, sock, image, pidFile)
		return err
	}
	if err := g.step("nbdkit", func() error {
		if err := createImage(image, originSize); err != nil {
			return err
		}
		return startNbdkit()
	}); err != nil {
		return err
	}
	if err := g.step("attach", func() error {
		if err := g.attach(ctx, nbd0, sock, "ref", "-t", requeueTimeout); err != nil {
			return err
		}
		return holdIO(nbd0)
	}); err != nil {
		return err
	}
	if err := g.step("mkfs.ext4 + mount", func() error {
		if err := g.mkfs(ctx, nbd0); err != nil {
			return err
		}
		return g.mount(ctx, nbd0, originMnt, "rw")
	}); err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	m := a.clone()
	kill := func() error { srv.kill(); return nil }
	if err := g.crashUnderLoad(ctx, m, kill, startNbdkit, sock, "ref"); err != nil {
		return err
	}
	if err := g.originDown(ctx, m); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0) }); err != nil {
		return err
	}
	return g.step("detach + stop nbdkit", func() error {
		if err := g.detach(ctx, nbd0); err != nil {
			return err
		}
		return srv.stop(ctx)
	})
}

// scenarioCrash is scenario 3: kill -9 with writes in flight.
func scenarioCrash(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx, "-t", requeueTimeout)
	if err != nil {
		return err
	}
	if err := g.step("hold I/O across a dead connection", func() error { return holdIO(nbd0) }); err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("umount, copy the origin, create, mount", func() error { return g.createSnap1Unmounted(ctx, snap1Store) }); err != nil {
		return err
	}
	m := a.clone()
	kill := func() error { d.kill(); return nil }
	restart := func() (err error) { d, err = g.serve(ctx); return err }
	if err := g.crashUnderLoad(ctx, m, kill, restart, serveSock, exportName); err != nil {
		return err
	}
	if err := g.step("status after restart: valid, persistent", func() error {
		st, err := g.requireValid(ctx, "snap1")
		if err == nil && !st.Persistent {
			err = errors.New("snap1 is not persistent")
		}
		if err == nil && st.ClustersCopied == 0 {
			err = errors.New("no cluster copied although the load overwrote set A")
		}
		return err
	}); err != nil {
		return err
	}
	if err := g.step("snapshot byte-identical to the create instant", func() error {
		if err := g.attach(ctx, nbd1, serveSock, "snap1", "-readonly"); err != nil {
			return err
		}
		start := time.Now()
		if err := compareDevice(nbd1, createInstantImage); err != nil {
			return err
		}
		g.log.Info("snapshot read and compared", "MiB_per_s", fmt.Sprintf("%.1f", float64(originSize>>20)/time.Since(start).Seconds()))
		return g.detach(ctx, nbd1)
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, m); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	return g.finish(ctx, d, "snap1")
}

// scenarioFull is scenario 4: two snapshots whose backing stores
// cannot hold what the writes copy, one limited by --max-size, one on a
// tmpfs too small for it (ENOSPC).
func scenarioFull(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("create snap1 --max-size 1M, snap2 on a 1 MiB tmpfs", func() error {
		if err := os.MkdirAll("/work/tiny", 0o755); err != nil {
			return err
		}
		if _, err := g.run(ctx, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/work/tiny"); err != nil {
			return err
		}
		if err := g.createSnap1(ctx, "--max-size", "1M"); err != nil {
			return err
		}
		_, err := g.nbdsnap(ctx, "create", "snap2", "--backing", "/work/tiny/snap2.cow")
		return err
	}); err != nil {
		return err
	}
	m := a.clone()
	if err := g.step("rewrite all of set A", func() error {
		for _, rel := range m.sorted("A/") {
			if err := overwriteAll(originMnt, rel, m); err != nil {
				return err
			}
		}
		syscall.Sync()
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("both snapshots invalid, with a reason", func() error {
		for _, s := range []string{"snap1", "snap2"} {
			st, err := g.status(ctx, s)
			if err != nil {
				return err
			}
			if st.State != "invalid" || st.Reason == "" {
				return fmt.Errorf("%s: state %q reason %q, expected invalid with a reason", s, st.State, st.Reason)
			}
			g.log.Info("invalid as expected", "snapshot", s, "reason", st.Reason)
		}
		out, err := g.nbdsnap(ctx, "status", "snap1")
		if err == nil && !strings.Contains(out, "invalid") {
			err = fmt.Errorf("nbdsnap status snap1 does not say invalid: %s", out)
		}
		return err
	}); err != nil {
		return err
	}
	if err := g.step("the origin keeps working: write set B", func() error {
		if err := writeSet(originMnt, "B", 16, 2, m); err != nil {
			return err
		}
		syscall.Sync()
		return nil
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, m); err != nil {
		return err
	}
	if err := g.step("kernel log: no I/O error", func() error { return g.noKernelProblems(ctx, nbd0) }); err != nil {
		return err
	}
	if err := g.finish(ctx, d, "snap1", "snap2"); err != nil {
		return err
	}
	return g.umount(ctx, "/work/tiny")
}

// overwriteAll rewrites a whole file in place with new contents of the same
// size, so that every one of its clusters is copied.
func overwriteAll(root, rel string, m fsModel) error {
	data := bytes.Repeat([]byte{0x5a}, len(m[rel]))
	for i := range data {
		data[i] ^= byte(i * 7)
	}
	f, err := os.OpenFile(root+"/"+rel, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	m[rel] = data
	return nil
}

// readPrefix reads the first n bytes of a device.
func readPrefix(dev string, n int) ([]byte, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	_, err = io.ReadFull(f, b)
	return b, err
}

// scenarioReadOnly is scenario 5: the snapshot device is read-only.
func scenarioReadOnly(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setAFrozen(ctx, 8)
	if err != nil {
		return err
	}
	// Attached without -readonly: the read-only flag must come from the
	// server's export flags.
	if err := g.step("attach snapshot (no -readonly)", func() error { return g.attach(ctx, nbd1, serveSock, "snap1") }); err != nil {
		return err
	}
	var before []byte
	if err := g.step("blockdev --getro = 1", func() error {
		out, err := g.run(ctx, "blockdev", "--getro", nbd1)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "1" {
			return fmt.Errorf("blockdev --getro %s = %q, want 1", nbd1, strings.TrimSpace(out))
		}
		before, err = readPrefix(nbd1, 1<<20)
		return err
	}); err != nil {
		return err
	}
	if err := g.step("a write through the kernel is refused", func() error {
		f, err := os.OpenFile(nbd1, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteAt(bytes.Repeat([]byte{0xee}, 4096), 0)
			if err == nil {
				err = f.Sync()
			}
			f.Close()
		}
		if err == nil {
			return errors.New("writing the snapshot device succeeded")
		}
		if !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("writing the snapshot device failed, but not as a refusal: %w", err)
		}
		g.log.Info("write refused", "err", err)
		out, code, err := g.runCode(ctx, "mount", "-t", "ext4", "-o", "rw", nbd1, snapMnt)
		if err != nil {
			return err
		}
		if code == 0 {
			mounts, _ := os.ReadFile("/proc/mounts")
			syscall.Unmount(snapMnt, 0)
			for _, l := range strings.Split(string(mounts), "\n") {
				if f := strings.Fields(l); len(f) > 3 && f[0] == nbd1 && !strings.HasPrefix(f[3], "ro") {
					return fmt.Errorf("mount -o rw of the snapshot gave a writable mount: %s", l)
				}
			}
		}
		g.log.Info("mount -o rw", "exit", code, "output", out)
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("a write on the wire is refused, the connection lives", func() error {
		c, err := dialNBD(serveSock, "snap1")
		if err != nil {
			return err
		}
		defer c.disconnect()
		if c.flags&nbdFlagReadOnly == 0 {
			return fmt.Errorf("export snap1 does not set NBD_FLAG_READ_ONLY (flags %#x)", c.flags)
		}
		errno, _, err := c.request(nbdCmdWrite, 0, 4096, bytes.Repeat([]byte{0xee}, 4096))
		if err != nil {
			return fmt.Errorf("write request: %w", err)
		}
		if errno == 0 {
			return errors.New("the server accepted a write to the snapshot export")
		}
		errno2, data, err := c.request(nbdCmdRead, 0, 4096, nil)
		if err != nil || errno2 != 0 {
			return fmt.Errorf("read after the refused write: errno %d, %v", errno2, err)
		}
		if !bytes.Equal(data, before[:4096]) {
			return errors.New("read after the refused write returns other data")
		}
		g.log.Info("wire write refused", "nbd_errno", errno)
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("snapshot unchanged, valid, daemon serving", func() error {
		after, err := readPrefix(nbd1, 1<<20)
		if err != nil {
			return err
		}
		if !bytes.Equal(before, after) {
			return errors.New("the snapshot's first MiB changed")
		}
		if d.exited() {
			return fmt.Errorf("the daemon exited: %v", d.err)
		}
		if _, err := g.requireValid(ctx, "snap1"); err != nil {
			return err
		}
		return g.noKernelProblems(ctx, nbd0, nbd1)
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, a); err != nil {
		return err
	}
	return g.finish(ctx, d, "snap1")
}
