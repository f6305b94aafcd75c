package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/test/powerloss/logwrites"
	"github.com/nbdsnap/nbdsnap/test/powerloss/workload"
)

// checkRecording replays one recording's log forward and checks the crash
// points chosen among its FLUSH and FUA entries after the first create
// began: all of them when points is 0 or they are fewer, else a sample of
// points drawn with seed. only >= 0 checks that entry alone. At the end the
// whole log must rebuild the data disk the guest left, byte for byte,
// which checks the replay itself.
func checkRecording(t *testing.T, r recording, nbdsnap string, points int, seed uint64, only int, dir string) {
	spec := r.rec.Spec
	if r.rec.Error != "" {
		t.Fatalf("the guest's workload failed: %s", r.rec.Error)
	}
	logFile, err := os.Open(r.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	fi, err := logFile.Stat()
	if err != nil {
		t.Fatal(err)
	}
	l, err := logwrites.Open(logFile, fi.Size())
	if err != nil {
		t.Fatalf("%s: %v", r.log, err)
	}
	first := l.FindMark("create-snap1")
	if first < 0 || l.FindMark("end") < 0 {
		t.Fatalf("%s: the log has no create-snap1 or end mark: not a complete recording", r.log)
	}
	var candidates []int
	for _, e := range l.Entries[first:] {
		if e.Flags&(logwrites.Flush|logwrites.FUA) != 0 {
			candidates = append(candidates, e.Index)
		}
	}
	chosen := candidates
	switch {
	case only >= 0:
		if only >= len(l.Entries) {
			t.Fatalf("NBDSNAP_POWERLOSS_ENTRY=%d: the log has %d entries", only, len(l.Entries))
		}
		chosen = []int{only}
	case points > 0 && len(candidates) > points:
		rnd := rand.New(rand.NewPCG(seed, uint64(spec.Index)))
		chosen = nil
		for _, i := range rnd.Perm(len(candidates))[:points] {
			chosen = append(chosen, candidates[i])
		}
		slices.Sort(chosen)
	}
	t.Logf("workload seed %d; log: %d entries, %d FLUSH/FUA entries from create-snap1 on; checking %d",
		spec.Seed, len(l.Entries), len(candidates), len(chosen))

	work, err := os.MkdirTemp("/dev/shm", "nbdsnap-pl-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(work)
	// Each point removes spec.Root; the directories above it go with the
	// last recording (os.Remove takes only an empty one).
	defer func() {
		for dir := filepath.Dir(spec.Root); dir != "/run" && dir != "/" && dir != "."; dir = filepath.Dir(dir) {
			os.Remove(dir)
		}
	}()
	replay := filepath.Join(work, "replay.img")
	dataSize, err := fileSize(r.data)
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(replay, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.Truncate(dataSize); err != nil {
		t.Fatal(err)
	}
	rep := logwrites.NewReplayer(l, img)
	c := &pointChecker{rec: &r.rec, writes: r.rec.Writes(), nbdsnap: nbdsnap, replay: replay, work: work, fsckClean: map[string]bool{}}
	failures := 0
	start := time.Now()
	for _, entry := range chosen {
		if err := rep.ApplyThrough(entry); err != nil {
			t.Fatalf("replay through entry %d: %v", entry, err)
		}
		passed := map[string]bool{}
		for _, e := range l.Entries[:entry] {
			if e.Flags&logwrites.Mark != 0 {
				passed[e.Mark] = true
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		summary, err := c.check(ctx, passed)
		cancel()
		if testing.Verbose() && err == nil {
			t.Logf("entry %d (%v): %s", entry, l.Entries[entry].Flags, summary)
		}
		if err != nil {
			failures++
			t.Errorf("%s (workload seed %d): crash at log entry %d (%v) of %d: %v\n"+
				"check this point alone: NBDSNAP_POWERLOSS_REPLAY=%s NBDSNAP_POWERLOSS_ENTRY=%d go test -count=1 -v -run 'TestPowerLoss/%s$' ./test/vm/",
				spec.Name(), spec.Seed, entry, l.Entries[entry].Flags, len(l.Entries), err, dir, entry, spec.Name())
			if failures == 3 {
				t.Fatalf("stopping after %d failed crash points", failures)
			}
		}
	}
	t.Logf("%d crash points checked in %v", len(chosen), time.Since(start).Round(time.Millisecond))
	if only >= 0 {
		return
	}
	if err := rep.ApplyThrough(len(l.Entries) - 1); err != nil {
		t.Fatalf("replay to the end: %v", err)
	}
	if err := sameContent(replay, r.data); err != nil {
		t.Errorf("the whole log does not rebuild the guest's data disk: %v", err)
	}
}

// pointChecker checks one crash point: the replayed disk as a power cut
// right after that log entry would have left it.
type pointChecker struct {
	rec     *workload.Record
	writes  map[int64][]int64 // rec.Writes(), once for every point
	nbdsnap string
	replay  string // the image being replayed, left untouched
	work    string // scratch space (tmpfs)
	// fsckClean remembers snapshot images (by hash) that e2fsck found
	// clean: a snapshot equal to its reference is checked once.
	fsckClean map[string]bool
}

// check starts nbdsnap on a copy of the replayed disk, as a restart after
// the power cut would, and checks that
//   - every snapshot whose create returned and whose clear did not begin is
//     listed valid and served; one whose clear returned is not listed; any
//     snapshot listed valid equals the origin at its create instant;
//   - the origin holds every write acknowledged before an fsync or with
//     FUA (and marked) before the crash point, and each block holds either
//     that write or one issued after it, never older content nor content
//     no write put there (Random); for Ext4 the origin, once mounted (ext4
//     recovers its journal), holds every file the last sync made durable,
//     and e2fsck -fn finds it clean, and each valid snapshot too;
//   - the daemon stops cleanly, and `nbdsnap check` finds every listed
//     valid snapshot's store clean.
//
// The summary says what was found, for the verbose log.
func (c *pointChecker) check(ctx context.Context, passed map[string]bool) (summary string, err error) {
	spec := c.rec.Spec
	scratch := filepath.Join(c.work, "scratch.img")
	if _, err := command(ctx, "cp", "--sparse=always", c.replay, scratch); err != nil {
		return "", err
	}
	defer os.Remove(scratch)
	var undo []func() error
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil && err == nil {
				err = fmt.Errorf("clean up: %w", uerr)
			}
		}
	}()
	if err := os.RemoveAll(spec.Root); err != nil {
		return "", err
	}
	if err := os.MkdirAll(spec.Root, 0o755); err != nil {
		return "", err
	}
	undo = append(undo, func() error { return os.RemoveAll(spec.Root) })
	loop := func(off, size int64) (string, error) {
		args := []string{"--find", "--show"}
		if size > 0 {
			args = append(args, "--offset", strconv.FormatInt(off, 10), "--sizelimit", strconv.FormatInt(size, 10))
		}
		out, err := command(ctx, "losetup", append(args, scratch)...)
		if err != nil {
			return "", err
		}
		dev := strings.TrimSpace(out)
		undo = append(undo, func() error { _, err := command(context.Background(), "losetup", "-d", dev); return err })
		return dev, nil
	}
	mount := func(dev, dir string, opts string) error {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if _, err := command(ctx, "mount", "-t", "ext4", "-o", opts, dev, dir); err != nil {
			return err
		}
		undo = append(undo, func() error { return unmount(context.Background(), dir) })
		return nil
	}
	// The disk's file systems are mounted read-write, so that ext4
	// recovers its journal as at any boot.
	var serveArgs []string
	switch spec.Layout {
	case workload.LayoutRaw:
		if err := os.MkdirAll(filepath.Join(spec.Root, "dev"), 0o755); err != nil {
			return "", err
		}
		for _, reg := range workload.RawRegions(spec.OriginSize) {
			dev, err := loop(reg.Offset, reg.Size)
			if err != nil {
				return "", err
			}
			if reg.Name == "state" {
				if err := mount(dev, filepath.Join(spec.Root, "statefs"), "rw"); err != nil {
					return "", err
				}
				continue
			}
			if err := os.Symlink(dev, filepath.Join(spec.Root, "dev", reg.Name)); err != nil {
				return "", err
			}
		}
		// The origin is another device now (a loop device, not the
		// guest's dm-linear): the user says it moved.
		serveArgs = append(serveArgs, "--accept-moved-origin")
	case workload.LayoutFile:
		dev, err := loop(0, 0)
		if err != nil {
			return "", err
		}
		if err := mount(dev, filepath.Join(spec.Root, "fs"), "rw"); err != nil {
			return "", err
		}
	}

	sock, ctl := filepath.Join(c.work, "data.sock"), filepath.Join(c.work, "data.ctl")
	var out bytes.Buffer
	d := exec.Command(c.nbdsnap, append([]string{"serve", c.rec.Origin, "--name", "data", "--listen", "unix:" + sock,
		"--control", ctl, "--state-dir", c.rec.State}, serveArgs...)...)
	d.Stdout, d.Stderr = &out, &out
	if err := d.Start(); err != nil {
		return "", err
	}
	exited := make(chan error, 1)
	go func() { exited <- d.Wait() }()
	stopped := false
	undo = append(undo, func() error {
		if !stopped {
			d.Process.Kill()
			<-exited
		}
		return nil
	})
	st, err := c.waitStatus(ctx, ctl, exited, &out)
	if err != nil {
		return "", err
	}
	var found []string
	for _, s := range st.Snapshots {
		found = append(found, s.Name+" "+s.State)
	}
	summary = fmt.Sprintf("listed [%s]", strings.Join(found, ", "))
	listed := map[string]control.SnapshotInfo{}
	for _, s := range st.Snapshots {
		listed[s.Name] = s
	}
	var problems []string
	for _, want := range c.rec.Snapshots(passed) {
		got, ok := listed[want.Name]
		delete(listed, want.Name)
		switch {
		case want.Gone && ok:
			problems = append(problems, fmt.Sprintf("snapshot %s: its clear returned before the crash, yet it is listed (%s)", want.Name, got.State))
			continue
		case want.Must && !ok:
			problems = append(problems, fmt.Sprintf("snapshot %s: its create returned before the crash, yet it is not listed", want.Name))
			continue
		case want.Must && got.State != control.StateValid:
			problems = append(problems, fmt.Sprintf("snapshot %s: its create returned before the crash, yet it is %s: %s", want.Name, got.State, got.Reason))
			continue
		case !ok || got.State != control.StateValid:
			continue
		}
		if !got.Served {
			problems = append(problems, fmt.Sprintf("snapshot %s: listed valid but not served", want.Name))
			continue
		}
		image := filepath.Join(c.work, want.Name+".img")
		if err := readExport(ctx, sock, want.Name, image); err != nil {
			return "", err
		}
		hash, err := disktest.HashFile(image)
		if err != nil {
			return "", err
		}
		if hash != want.Hash {
			problems = append(problems, fmt.Sprintf("snapshot %s: listed valid, but its image (sha256 %.12s) is not the origin at its create instant (%.12s)", want.Name, hash, want.Hash))
		} else if spec.Workload == workload.Ext4 && !c.fsckClean[hash] {
			if err := fsckClean(ctx, image); err != nil {
				problems = append(problems, fmt.Sprintf("snapshot %s: %v", want.Name, err))
			} else {
				c.fsckClean[hash] = true
			}
		}
		os.Remove(image)
	}
	for name, s := range listed {
		problems = append(problems, fmt.Sprintf("snapshot %s (%s) is listed, but the workload never created it", name, s.State))
	}

	origin := filepath.Join(c.work, "origin.img")
	if err := readExport(ctx, sock, "data", origin); err != nil {
		return "", err
	}
	defer os.Remove(origin)
	switch spec.Workload {
	case workload.Random:
		required := c.rec.Required(passed)
		summary += fmt.Sprintf(", %d origin blocks with a durable write", len(required))
		problems = append(problems, c.checkBlocks(origin, required)...)
	case workload.Ext4:
		files := c.rec.Files(passed)
		summary += fmt.Sprintf(", %d durable files", len(files))
		problems = append(problems, c.checkFiles(ctx, origin, files)...)
	}

	d.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		stopped = true
		if err != nil {
			problems = append(problems, fmt.Sprintf("nbdsnap serve after SIGTERM: %v (its log is below)", err))
		}
	case <-time.After(30 * time.Second):
		problems = append(problems, "nbdsnap serve did not stop within 30s of SIGTERM")
	}
	if stopped {
		for _, s := range st.Snapshots {
			if s.State != control.StateValid {
				continue
			}
			if _, err := command(ctx, c.nbdsnap, "check", s.BackingPath); err != nil {
				problems = append(problems, fmt.Sprintf("snapshot %s: %v", s.Name, err))
			}
		}
	}
	if len(problems) > 0 {
		return "", fmt.Errorf("%d problems:\n  %s\ndaemon log:\n%s", len(problems), strings.Join(problems, "\n  "), out.String())
	}
	return summary, nil
}

// waitStatus polls the control socket until the daemon answers: it is
// ready once restart has settled every record.
func (c *pointChecker) waitStatus(ctx context.Context, ctl string, exited <-chan error, out *bytes.Buffer) (control.Status, error) {
	var st control.Status
	for {
		res, err := command(ctx, c.nbdsnap, "status", "--json", "--control", ctl)
		if err == nil {
			if err := json.Unmarshal([]byte(res), &st); err != nil {
				return st, fmt.Errorf("nbdsnap status --json: %w\n%s", err, res)
			}
			return st, nil
		}
		select {
		case err := <-exited:
			return st, fmt.Errorf("nbdsnap serve exited at start: %v\n%s", err, out.String())
		case <-ctx.Done():
			return st, fmt.Errorf("nbdsnap serve not ready: %w (last status: %v)\n%s", ctx.Err(), err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkBlocks compares each block of the origin with what the record
// allows there.
func (c *pointChecker) checkBlocks(origin string, required map[int64]int64) []string {
	seed, writes := c.rec.Spec.Seed, c.writes
	b, err := os.ReadFile(origin)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	for i := int64(0); i*workload.BlockSize < int64(len(b)) && len(problems) < 10; i++ {
		seq, err := workload.Decode(b[i*workload.BlockSize:(i+1)*workload.BlockSize], seed, i)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("origin %v", err))
		case seq == 0 && required[i] > 0:
			problems = append(problems, fmt.Sprintf("origin block %d: never written, yet write %d to it was made durable before the crash", i, required[i]))
		case seq > 0 && !slices.Contains(writes[i], seq):
			problems = append(problems, fmt.Sprintf("origin block %d: holds write %d, which did not write it", i, seq))
		case seq < required[i]:
			problems = append(problems, fmt.Sprintf("origin block %d: holds write %d, older than write %d made durable before the crash", i, seq, required[i]))
		}
	}
	return problems
}

// checkFiles mounts a copy of the origin (ext4 recovers its journal, as at
// a boot after the power cut), checks the files the last sync made durable,
// then requires e2fsck -fn to find it clean.
func (c *pointChecker) checkFiles(ctx context.Context, origin string, files []workload.FileExpect) []string {
	mnt := filepath.Join(c.work, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return []string{err.Error()}
	}
	if _, err := command(ctx, "mount", "-t", "ext4", "-o", "loop", origin, mnt); err != nil {
		return []string{fmt.Sprintf("origin: %v", err)}
	}
	var problems []string
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(mnt, f.Path))
		switch {
		case errors.Is(err, os.ErrNotExist) && f.MayBeGone:
		case err != nil:
			problems = append(problems, fmt.Sprintf("origin: file %s, made durable by a sync before the crash: %v", f.Path, err))
		case workload.HashBytes(b) != f.Hash:
			problems = append(problems, fmt.Sprintf("origin: file %s, made durable by a sync before the crash, has other content (%d bytes)", f.Path, len(b)))
		}
	}
	if err := unmount(ctx, mnt); err != nil {
		return append(problems, fmt.Sprintf("origin: %v", err))
	}
	if err := fsckClean(ctx, origin); err != nil {
		problems = append(problems, "origin: "+err.Error())
	}
	return problems
}

// unmount unmounts dir, retrying for a few seconds while the kernel says it
// is busy: right after a mount that recovered a journal, umount sometimes
// finds the file system busy although nothing of ours has it open.
func unmount(ctx context.Context, dir string) error {
	for i := 0; ; i++ {
		out, err := command(ctx, "umount", dir)
		if err == nil || !strings.Contains(out, "busy") || i == 50 {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fsckClean requires e2fsck -fn to exit 0: nothing to fix.
func fsckClean(ctx context.Context, image string) error {
	cmd := exec.CommandContext(ctx, "e2fsck", "-fn", image)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("e2fsck -fn: %v, not clean:\n%s", err, out)
	}
	return nil
}

// readExport copies an export to a file with nbdcopy.
func readExport(ctx context.Context, sock, export, file string) error {
	uri := "nbd+unix:///" + export + "?socket=" + sock
	if _, err := command(ctx, "nbdcopy", "--synchronous", uri, file); err != nil {
		return fmt.Errorf("read export %s: %w", export, err)
	}
	return nil
}

// command runs a tool; its error carries the tool's output.
func command(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func fileSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// sameContent compares two files byte for byte and names the first
// differing 4 KiB block.
func sameContent(a, b string) error {
	x, err := os.ReadFile(a)
	if err != nil {
		return err
	}
	y, err := os.ReadFile(b)
	if err != nil {
		return err
	}
	if len(x) != len(y) {
		return fmt.Errorf("%d bytes, the data disk %d", len(x), len(y))
	}
	for off := 0; off < len(x); off += 4096 {
		end := min(off+4096, len(x))
		if !bytes.Equal(x[off:end], y[off:end]) {
			return fmt.Errorf("they first differ in the 4 KiB block at offset %d", off)
		}
	}
	return nil
}
