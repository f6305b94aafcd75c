package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// scenarioHeldWrites checks held writes across a kill -9 of the daemon.
// Under a persistent snapshot a plain first write to a cluster is answered
// before the origin write, which waits for the store's commit; the daemon
// keeps such writes in a log next to its control socket (a tmpfs, which
// outlives the process) and replays them when it starts again. So a kill
// -9 must lose no write the kernel was told was done:
//
//   - a burst of buffered writes (set B, half of set A's files rewritten)
//     ends with sync; the daemon must have held some of its writes, and
//     every file must survive the crash as it was;
//   - set C is written and not synced (it may be lost: it is deleted before
//     the checks); then, with the store stopped, the other half of set A is
//     overwritten in place with O_DIRECT, 64 KiB at a time, no flush: each
//     write that returned was answered by the daemon, and must survive.
//     With the store stopped nothing is committed, so the first writes
//     among them are all still held, their clusters' old data only in the
//     daemon's memory, when the daemon is killed right after: snap1 stays
//     intact only if the replay copies that data into the store before it
//     writes the origin.
//
// snap1's backing store is a block device, /dev/nbd2, that nbdkit serves
// from an image in /work, which lets the scenario stop the store (SIGSTOP
// to nbdkit). And the daemon holds writes only for a store whose sync takes
// 100 µs or more: a sync of a file in the guest's tmpfs takes less (with
// snap1's store there, no write was held), a FLUSH of the device makes a
// round trip through nbdkit.
//
// There is no reconnection: the kernel lets go of the dead device (detach,
// lazy umount), the daemon starts again and /dev/nbd0 is attached anew.
// The origin's journal is replayed with a mount, e2fsck -fn must then find
// it clean and its files must be exactly what was answered; snap1, created
// with the file system unmounted, must be byte-identical to the origin at
// its create instant and pass e2fsck -fn.
func scenarioHeldWrites(ctx context.Context, g *guest) error {
	var store *proc
	if err := g.step("store disk: nbdkit, attach "+hwStoreDev, func() (err error) {
		if err := createImage(hwStoreImage, hwStoreSize); err != nil {
			return err
		}
		if store, err = g.startNbdkit(ctx, hwStoreSock, hwStoreImage, hwStorePid); err != nil {
			return err
		}
		return g.attach(ctx, hwStoreDev, hwStoreSock, "store")
	}); err != nil {
		return err
	}
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("umount, copy the origin, create, mount", func() error {
		if err := g.createSnap1Unmounted(ctx, hwStoreDev); err != nil {
			return err
		}
		g.log.Info("where the files live", "origin", fsOf(originImage), "store_disk_image", fsOf(hwStoreImage), "held_writes_log", fsOf(controlSock))
		return nil
	}); err != nil {
		return err
	}
	// m is what the origin must hold after the crash: set A, then what the
	// synced burst and the answered direct writes changed.
	m := a.clone()
	if err := g.step("write set B, rewrite half of A, sync; writes were held", func() error {
		if err := writeSet(originMnt, "B", 48, 2, m); err != nil {
			return err
		}
		for i, rel := range a.sorted("A/") {
			if i%2 == 0 {
				if err := overwriteAll(originMnt, rel, m); err != nil {
					return err
				}
			}
		}
		syscall.Sync()
		st, err := g.daemonStatus(ctx)
		if err != nil {
			return err
		}
		if st.HeldWrites.Total == 0 {
			return fmt.Errorf("no write was held: the store's sync was too cheap to hold writes (under 100 µs; the store is %s, served by nbdkit from %s on %s)",
				hwStoreDev, hwStoreImage, fsOf(hwStoreImage))
		}
		g.log.Info("synced burst", "files", len(m), "bytes", m.bytes(), "held_writes_total", st.HeldWrites.Total)
		return nil
	}); err != nil {
		return err
	}
	direct := directWrites(a, 6)
	if err := g.step("write set C (no sync); store stopped: direct writes to the other half of A held; kill -9", func() error {
		if err := writeSet(originMnt, "C", 16, 5, fsModel{}); err != nil {
			return err
		}
		if err := store.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			return err
		}
		if err := writeDirect(ctx, originMnt, direct); err != nil {
			return err
		}
		st, err := g.daemonStatus(ctx)
		if err != nil {
			return err
		}
		if st.HeldWrites.Writes == 0 {
			return fmt.Errorf("the %d direct writes returned with the store stopped, but the daemon holds none", len(direct))
		}
		// The daemon's threads blocked on the store's I/O end only once
		// it is answered: nbdkit must go on for the kill to complete.
		if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			return err
		}
		if err := store.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			return err
		}
		d.kill()
		g.log.Info("killed the daemon", "direct_writes", len(direct), "held_writes", st.HeldWrites.Writes)
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("detach the dead /dev/nbd0, umount -l", func() error {
		// The detach fails the I/O the dead connection left pending (a
		// journal commit's flush, say) and what comes after at once, so
		// that the unmount cannot hang on the file system's writeback.
		// The device is let go of (its pid file gone) only once nothing
		// has it open, after the umount.
		if _, err := g.run(ctx, "nbd-client", "-d", nbd0); err != nil {
			return err
		}
		if _, err := g.run(ctx, "umount", "-l", originMnt); err != nil {
			return err
		}
		if err := waitAttached(ctx, nbd0, false); err != nil {
			return err
		}
		// The kill made I/O errors on the dead device, none on the store
		// disk; the kernel log is cleared so that the last check sees only
		// what came after.
		if err := g.noKernelProblems(ctx, hwStoreDev); err != nil {
			return err
		}
		bad, err := g.kernelLogProblems(ctx, nbd0)
		if err != nil {
			return err
		}
		g.log.Info("kernel log after the kill", "errors", strings.Join(bad, "\n"))
		_, err = g.run(ctx, "dmesg", "-c")
		return err
	}); err != nil {
		return err
	}
	if err := g.step("restart (replays the held writes): snap1 valid, persistent", func() error {
		var err error
		if d, err = g.serve(ctx); err != nil {
			return err
		}
		snap, err := g.requireValid(ctx, "snap1")
		if err != nil {
			return err
		}
		if !snap.Persistent {
			return errors.New("snap1 is not persistent")
		}
		st, err := g.daemonStatus(ctx)
		if err != nil {
			return err
		}
		if st.HeldWrites.Failed {
			return errors.New("the restarted daemon reports a failed held write")
		}
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("attach origin, replay the journal (mount, umount), e2fsck -fn", func() error {
		if err := g.attach(ctx, nbd0, serveSock, exportName); err != nil {
			return err
		}
		if err := g.mount(ctx, nbd0, originMnt, "rw"); err != nil {
			return err
		}
		if err := g.umount(ctx, originMnt); err != nil {
			return err
		}
		return g.fsckClean(ctx, nbd0)
	}); err != nil {
		return err
	}
	if err := g.step("mount origin, delete set C", func() error {
		if err := g.mount(ctx, nbd0, originMnt, "rw"); err != nil {
			return err
		}
		return os.RemoveAll(filepath.Join(originMnt, "C"))
	}); err != nil {
		return err
	}
	// Every direct write was answered: the origin must hold them all.
	for _, w := range direct {
		copy(m[w.rel][w.off:], w.data)
	}
	if err := g.originDown(ctx, m); err != nil {
		return err
	}
	if err := g.step("snapshot byte-identical to the create instant, e2fsck -fn", func() error {
		if err := g.attach(ctx, nbd1, serveSock, "snap1", "-readonly"); err != nil {
			return err
		}
		if err := compareDevice(nbd1, createInstantImage); err != nil {
			return err
		}
		if err := g.fsckClean(ctx, nbd1); err != nil {
			return err
		}
		return g.detach(ctx, nbd1)
	}); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1, hwStoreDev) }); err != nil {
		return err
	}
	if err := g.finish(ctx, d, "snap1"); err != nil {
		return err
	}
	return g.step("detach the store disk, stop nbdkit", func() error {
		if err := g.detach(ctx, hwStoreDev); err != nil {
			return err
		}
		return store.stop(ctx)
	})
}

// The heldwrites scenario's store disk.
const (
	hwStoreDev   = "/dev/nbd2"
	hwStoreSize  = 96 << 20 // snap1's store: up to the origin's 64 MiB copied, its map and header
	hwStoreImage = "/work/store-disk.img"
	hwStoreSock  = "/run/nbdkit-store.sock"
	hwStorePid   = "/run/nbdkit-store.pid"
)

// directWrite is one in-place overwrite of a file range.
type directWrite struct {
	rel  string
	off  int
	data []byte
}

// directChunk is the size of a direct write.
const directChunk = 64 << 10

// directWrites overwrites the half of set A (a: its contents now) that the
// synced burst left alone, whole, directChunk at a time, with new random
// data. Those files are untouched since the snapshot, so most of these are
// first writes to their clusters, which the daemon holds. Their sizes are
// multiples of 4 KiB (writeSet), as O_DIRECT needs.
func directWrites(a fsModel, seed uint64) []directWrite {
	r := rand.New(rand.NewPCG(seed, 4))
	var ws []directWrite
	for i, rel := range a.sorted("A/") {
		if i%2 == 0 {
			continue
		}
		for off := 0; off < len(a[rel]); off += directChunk {
			ws = append(ws, directWrite{rel: rel, off: off, data: randomBytes(r, min(directChunk, len(a[rel])-off))})
		}
	}
	return ws
}

// writeDirect makes the writes one after the other with O_DIRECT and no
// flush: each returns once the device answered it. With the store stopped,
// a first write the daemon does not hold waits for its commit, that is for
// ever: hence the time limit.
func writeDirect(ctx context.Context, root string, ws []directWrite) error {
	done := make(chan error, 1)
	go func() {
		buf := alignedBuf(directChunk)
		for _, w := range ws {
			f, err := os.OpenFile(filepath.Join(root, w.rel), os.O_WRONLY|syscall.O_DIRECT, 0)
			if err != nil {
				done <- err
				return
			}
			n := copy(buf, w.data)
			_, err = f.WriteAt(buf[:n], int64(w.off))
			f.Close()
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("the direct writes did not all return within 30s with the store stopped: they wait for its commit instead of being held")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fsOf names the file system a path is on, from /proc/mounts: the longest
// mount point that contains it, and its type.
func fsOf(path string) string {
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return err.Error()
	}
	best, fstype := "", "?"
	for _, l := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			continue
		}
		if (path == f[1] || strings.HasPrefix(path, strings.TrimSuffix(f[1], "/")+"/")) && len(f[1]) >= len(best) {
			best, fstype = f[1], f[2]
		}
	}
	return best + " (" + fstype + ")"
}
