package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The rollback scenario's files in /work (a tmpfs): s1's backing store, and
// s1's image as dd read it through the kernel right after the create, which
// the origin image must equal once a rollback to s1 is complete.
const (
	rbS1Cow = "/work/s1.cow"
	rbS1Img = "/work/rollback-s1.img"
)

// rbStatus is the part of `nbdsnap status --json` (the daemon's) the
// rollback and heldwrites scenarios check.
type rbStatus struct {
	Rollback *struct {
		Snapshot       string    `json:"snapshot"`
		State          string    `json:"state"`
		Error          string    `json:"error"`
		Finished       time.Time `json:"finished"`
		Consume        bool      `json:"consume"`
		TotalBytes     int64     `json:"total_bytes"`
		RemainingBytes int64     `json:"remaining_bytes"`
	} `json:"rollback"`
	Snapshots []struct {
		Name           string `json:"name"`
		State          string `json:"state"`
		ClusterSize    int64  `json:"cluster_size"`
		ClustersCopied int64  `json:"clusters_copied"`
	} `json:"snapshots"`
	HeldWrites struct {
		Writes int64 `json:"writes"` // held now
		Total  int64 `json:"total"`  // held since the daemon started
		Failed bool  `json:"failed"`
	} `json:"held_writes"`
}

// daemonStatus reads `nbdsnap status --json` without a snapshot name.
func (g *guest) daemonStatus(ctx context.Context) (rbStatus, error) {
	out, err := g.nbdsnap(ctx, "status", "--json")
	if err != nil {
		return rbStatus{}, err
	}
	var st rbStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return rbStatus{}, fmt.Errorf("nbdsnap status --json: %w\n%s", err, out)
	}
	return st, nil
}

// rollbackRefused runs `nbdsnap rollback s1 --wait` while /dev/nbd0 has the
// origin export open: it must exit with status 1, say that a client has
// the origin open and that it must be detached, and start nothing (no
// rollback in the daemon's status, no progress file).
func (g *guest) rollbackRefused(ctx context.Context) error {
	out, code, err := g.runCode(ctx, "nbdsnap", "rollback", "s1", "--wait", "--control", controlSock)
	if err != nil {
		return err
	}
	g.log.Info("rollback with /dev/nbd0 attached", "exit", code, "output", strings.TrimSpace(out))
	if code != 1 {
		return fmt.Errorf("nbdsnap rollback s1 with /dev/nbd0 attached: exit status %d, want 1:\n%s", code, out)
	}
	for _, want := range []string{"nbdsnap: ", "open by 1 NBD client(s)", "unmount, detach them (nbd-client -d /dev/nbdX)", "--force"} {
		if !strings.Contains(out, want) {
			return fmt.Errorf("nbdsnap rollback s1 with /dev/nbd0 attached says %q, which lacks %q", strings.TrimSpace(out), want)
		}
	}
	st, err := g.daemonStatus(ctx)
	if err != nil {
		return err
	}
	if st.Rollback != nil {
		return fmt.Errorf("a refused rollback shows in the status: %+v", *st.Rollback)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "rollback.progress")); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("a refused rollback left a progress file in the state directory (stat: %v)", err)
	}
	return nil
}

// rollbackWait runs `nbdsnap rollback s1 --wait` with more flags and checks
// its exit status and output: the start line on stdout, progress lines
// (stderr, not a terminal) ending with the done one, and the result line
// last.
func (g *guest) rollbackWait(ctx context.Context, consume bool) error {
	args := []string{"rollback", "s1", "--wait"}
	result := "s1: rollback complete"
	if consume {
		args = append(args, "--consume")
		result += ", s1 cleared"
	}
	out, code, err := g.runCode(ctx, "nbdsnap", append(args, "--control", controlSock)...)
	if err != nil {
		return err
	}
	g.log.Info("nbdsnap "+strings.Join(args, " "), "exit", code, "output", strings.TrimSpace(out))
	if code != 0 {
		return fmt.Errorf("nbdsnap %s: exit status %d:\n%s", strings.Join(args, " "), code, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var started, done bool
	for _, l := range lines {
		started = started || strings.HasPrefix(l, "s1: rollback started: the origin shows s1 now; ")
		done = done || (strings.HasPrefix(l, "rollback to s1: done, ") && strings.Contains(l, "copied back (100%)"))
	}
	if !started || !done || lines[len(lines)-1] != result {
		return fmt.Errorf("nbdsnap %s: want a start line, a done progress line and %q last; got:\n%s", strings.Join(args, " "), result, out)
	}
	return nil
}

// requireRollbackDone checks the daemon's status after a rollback to s1
// whose --wait returned: done, nothing remaining, total bytes as expected
// (the bytes s1 had copied when it began), consume as asked; and the text
// status shows it on a line of its own.
func (g *guest) requireRollbackDone(ctx context.Context, total int64, consume bool) (rbStatus, error) {
	st, err := g.daemonStatus(ctx)
	if err != nil {
		return st, err
	}
	rb := st.Rollback
	switch {
	case rb == nil:
		return st, errors.New("nbdsnap status --json shows no rollback after rollback --wait returned")
	case rb.Snapshot != "s1" || rb.State != "done" || rb.Error != "" || rb.RemainingBytes != 0 || rb.Finished.IsZero() ||
		rb.TotalBytes != total || rb.Consume != consume:
		return st, fmt.Errorf("status after the rollback: %+v; want s1, done, no error, a finish time, %d bytes in all and none remaining, consume %v",
			*rb, total, consume)
	}
	out, err := g.nbdsnap(ctx, "status")
	if err != nil {
		return st, err
	}
	if !strings.Contains(out, "\nrollback to s1: done, ") || !strings.Contains(out, "copied back (100%)") {
		return st, fmt.Errorf("nbdsnap status does not show the rollback done:\n%s", out)
	}
	g.log.Info("status after the rollback", "rollback", strings.Split(out, "\n")[1])
	return st, nil
}

// snapCopied returns the bytes a snapshot has copied (what a rollback to it
// restores), from the daemon's status.
func snapCopied(st rbStatus, name string) (int64, error) {
	for _, s := range st.Snapshots {
		if s.Name == name {
			if s.State != "valid" {
				return 0, fmt.Errorf("%s is %q, want valid", name, s.State)
			}
			return s.ClustersCopied * s.ClusterSize, nil
		}
	}
	return 0, fmt.Errorf("nbdsnap status does not list %s", name)
}

// scenarioRollback rolls the origin back to a snapshot with the kernel
// client, the way the command's help says to: ext4 on /dev/nbd0, file set A,
// `create s1 --freeze` (s1's image kept with a dd through /dev/nbd1); set B
// and changes to A; `nbdsnap rollback s1` refused (exit status 1, "detach")
// while /dev/nbd0 is attached, mounted or not; umount, detach, `rollback s1
// --wait`: the origin image then equals s1's byte for byte, the status shows
// the rollback done, and attached and mounted again the origin passes
// e2fsck -fn and holds set A exactly. Then s1, kept, is rolled back to
// again after more changes, with --consume: set A again, and s1 is gone
// from the list with its backing store.
func scenarioRollback(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("create s1 --freeze", func() error {
		_, err := g.nbdsnap(ctx, "create", "s1", "--backing", rbS1Cow, "--freeze", originMnt)
		return err
	}); err != nil {
		return err
	}
	if err := g.step("s1's image: dd of s1 attached -readonly", func() error {
		if err := g.attach(ctx, nbd1, serveSock, "s1", "-readonly"); err != nil {
			return err
		}
		if err := g.ddWhole(ctx, nbd1, rbS1Img); err != nil {
			return err
		}
		return g.detach(ctx, nbd1)
	}); err != nil {
		return err
	}
	if _, err := g.setB(ctx, a); err != nil {
		return err
	}
	if err := g.step("refused while the origin is mounted", func() error { return g.rollbackRefused(ctx) }); err != nil {
		return err
	}
	if err := g.step("umount; refused while /dev/nbd0 is attached", func() error {
		if err := g.umount(ctx, originMnt); err != nil {
			return err
		}
		return g.rollbackRefused(ctx)
	}); err != nil {
		return err
	}
	var total int64
	if err := g.step("detach /dev/nbd0; the origin is not s1", func() error {
		if err := g.detach(ctx, nbd0); err != nil {
			return err
		}
		var err error
		total, err = g.originNotS1(ctx)
		if err == nil && total == 0 {
			err = errors.New("s1 copied nothing although set B overwrote set A")
		}
		return err
	}); err != nil {
		return err
	}
	if err := g.step("rollback s1 --wait", func() error { return g.rollbackWait(ctx, false) }); err != nil {
		return err
	}
	if err := g.step("the origin image is s1's (cmp); status: done, s1 kept", func() error {
		if err := g.sameFiles(ctx, originImage, rbS1Img, true); err != nil {
			return err
		}
		st, err := g.requireRollbackDone(ctx, total, false)
		if err != nil {
			return err
		}
		_, err = snapCopied(st, "s1")
		g.log.Info("rolled back", "bytes", total)
		return err
	}); err != nil {
		return err
	}
	if err := g.step("attach /dev/nbd0, e2fsck -fn, mount, compare with set A", func() error {
		if err := g.originBack(ctx); err != nil {
			return err
		}
		return checkTree(originMnt, a)
	}); err != nil {
		return err
	}

	// Again: s1 was kept, so the origin can go back to it a second time.
	if err := g.step("write set C, change A again; umount, detach", func() error {
		m := a.clone()
		if err := writeSet(originMnt, "C", 16, 3, m); err != nil {
			return err
		}
		if err := mutate(originMnt, "A", 4, m); err != nil {
			return err
		}
		syscall.Sync()
		if err := checkTree(originMnt, m); err != nil {
			return err
		}
		if err := g.umount(ctx, originMnt); err != nil {
			return err
		}
		if err := g.detach(ctx, nbd0); err != nil {
			return err
		}
		var err error
		total, err = g.originNotS1(ctx)
		return err
	}); err != nil {
		return err
	}
	if err := g.step("rollback s1 --wait --consume", func() error { return g.rollbackWait(ctx, true) }); err != nil {
		return err
	}
	if err := g.step("the origin image is s1's (cmp); status: done; s1 gone from the list", func() error {
		if err := g.sameFiles(ctx, originImage, rbS1Img, true); err != nil {
			return err
		}
		st, err := g.requireRollbackDone(ctx, total, true)
		if err != nil {
			return err
		}
		if len(st.Snapshots) != 0 {
			return fmt.Errorf("status lists %d snapshots after rollback --consume, want none: %+v", len(st.Snapshots), st.Snapshots)
		}
		out, err := g.nbdsnap(ctx, "list")
		if err != nil {
			return err
		}
		if strings.Contains(out, "s1") {
			return fmt.Errorf("nbdsnap list still shows s1 after rollback --consume:\n%s", out)
		}
		out, err = g.nbdsnap(ctx, "list", "--json")
		if err != nil {
			return err
		}
		var list []json.RawMessage
		if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 0 {
			return fmt.Errorf("nbdsnap list --json after rollback --consume: %v, want []:\n%s", err, out)
		}
		if _, err := os.Stat(rbS1Cow); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("s1's backing store %s is still there after rollback --consume (stat: %v)", rbS1Cow, err)
		}
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("attach /dev/nbd0, e2fsck -fn, mount", func() error { return g.originBack(ctx) }); err != nil {
		return err
	}
	if err := g.originDown(ctx, a); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	if err := g.finish(ctx, d); err != nil {
		return err
	}
	return os.Remove(rbS1Img)
}

// originNotS1 checks, with the origin detached, that its image differs
// from s1's (else a rollback that restored nothing would pass) and returns
// what s1 has copied: the bytes a rollback to it puts back.
func (g *guest) originNotS1(ctx context.Context) (int64, error) {
	if err := g.sameFiles(ctx, originImage, rbS1Img, false); err != nil {
		return 0, err
	}
	st, err := g.daemonStatus(ctx)
	if err != nil {
		return 0, err
	}
	return snapCopied(st, "s1")
}

// originBack attaches the origin at /dev/nbd0 again, checks it with
// e2fsck -fn and mounts it.
func (g *guest) originBack(ctx context.Context) error {
	if err := g.attach(ctx, nbd0, serveSock, exportName); err != nil {
		return err
	}
	if err := g.fsckClean(ctx, nbd0); err != nil {
		return err
	}
	return g.mount(ctx, nbd0, originMnt, "rw")
}
