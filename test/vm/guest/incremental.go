package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
)

// The incremental scenario's files in /work (a tmpfs): the full backup of
// s1, brought up to s2 by the incremental; s1's image as it was copied; a
// full copy of s2 to compare with.
const (
	incFull  = "/work/full.img"
	incS1Img = "/work/s1.img"
	incS2Img = "/work/s2.img"
)

// diffJSON is `nbdsnap diff --json`.
type diffJSON struct {
	Base         string `json:"base"`
	Target       string `json:"target"`
	Granularity  int64  `json:"granularity"`
	ChangedBytes int64  `json:"changed_bytes"`
	Ranges       []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
	} `json:"ranges"`
}

// ddWhole copies a whole device into a file with dd.
func (g *guest) ddWhole(ctx context.Context, dev, file string) error {
	_, err := g.run(ctx, "dd", "if="+dev, "of="+file, "bs=1M")
	return err
}

// sameFiles requires two files to hold the same bytes (cmp), or, with want
// false, to differ.
func (g *guest) sameFiles(ctx context.Context, a, b string, want bool) error {
	out, code, err := g.runCode(ctx, "cmp", a, b)
	if err != nil {
		return err
	}
	if same := code == 0; same != want {
		return fmt.Errorf("cmp %s %s: exit status %d (%s); want them %s", a, b, code, bytes.TrimSpace([]byte(out)),
			map[bool]string{true: "equal", false: "different"}[want])
	}
	return nil
}

// scenarioIncremental is an incremental backup through the kernel's NBD
// client, with the tools of a minimal system: ext4 on /dev/nbd0, file set A,
// `create s1 --freeze`; s1 attached read-only and copied whole with dd; set
// B and changes to A, `create s2 --freeze`; the ranges `nbdsnap diff s1 s2
// --json` lists copied with dd from s2 (attached read-only) into the copy
// of s1. The copy must then equal a full dd of s2 (cmp) and pass e2fsck
// -fn, and hold less than the whole disk's worth of copied ranges.
func scenarioIncremental(ctx context.Context, g *guest) error {
	d, err := g.originUp(ctx)
	if err != nil {
		return err
	}
	a, err := g.setA(ctx, 32)
	if err != nil {
		return err
	}
	if err := g.step("create s1 --freeze", func() error {
		_, err := g.nbdsnap(ctx, "create", "s1", "--backing", "/work/s1.cow", "--freeze", originMnt)
		return err
	}); err != nil {
		return err
	}
	if err := g.step("full backup: dd of s1 attached -readonly", func() error {
		if err := g.attach(ctx, nbd1, serveSock, "s1", "-readonly"); err != nil {
			return err
		}
		if err := g.ddWhole(ctx, nbd1, incS1Img); err != nil {
			return err
		}
		if err := g.detach(ctx, nbd1); err != nil {
			return err
		}
		_, err := g.run(ctx, "cp", incS1Img, incFull)
		return err
	}); err != nil {
		return err
	}
	origin, err := g.setB(ctx, a)
	if err != nil {
		return err
	}
	if err := g.step("create s2 --freeze", func() error {
		_, err := g.nbdsnap(ctx, "create", "s2", "--backing", "/work/s2.cow", "--freeze", originMnt)
		return err
	}); err != nil {
		return err
	}
	var diff diffJSON
	if err := g.step("nbdsnap diff s1 s2 --json", func() error {
		out, err := g.nbdsnap(ctx, "diff", "s1", "s2", "--json")
		if err != nil {
			return err
		}
		if err := json.Unmarshal([]byte(out), &diff); err != nil {
			return fmt.Errorf("nbdsnap diff --json: %w\n%s", err, out)
		}
		var sum int64
		for _, r := range diff.Ranges {
			if r.Offset%diff.Granularity != 0 || r.Length <= 0 || r.Offset+r.Length > originSize {
				return fmt.Errorf("range [%d,+%d) is not whole %d-byte blocks of the %d-byte disk", r.Offset, r.Length, diff.Granularity, originSize)
			}
			sum += r.Length
		}
		if sum != diff.ChangedBytes || sum == 0 || sum >= originSize/2 {
			return fmt.Errorf("the ranges add up to %d bytes, changed_bytes says %d; want more than none and less than half the %d-byte disk",
				sum, diff.ChangedBytes, originSize)
		}
		g.log.Info("changed since s1", "ranges", len(diff.Ranges), "bytes", sum, "granularity", diff.Granularity)
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("attach s2 -readonly", func() error {
		return g.attach(ctx, nbd1, serveSock, "s2", "-readonly")
	}); err != nil {
		return err
	}
	if err := g.step("incremental: dd the changed ranges of s2 into the full backup", func() error {
		for _, r := range diff.Ranges {
			if _, err := g.run(ctx, "dd", "if="+nbd1, "of="+incFull, "bs=1M", "iflag=skip_bytes,count_bytes",
				"oflag=seek_bytes", "conv=notrunc", "skip="+strconv.FormatInt(r.Offset, 10),
				"seek="+strconv.FormatInt(r.Offset, 10), "count="+strconv.FormatInt(r.Length, 10)); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	if err := g.step("the backup equals a full dd of s2 (cmp), which is not s1", func() error {
		if err := g.ddWhole(ctx, nbd1, incS2Img); err != nil {
			return err
		}
		// A device that still answered from s1's cached pages would make
		// the two copies equal for the wrong reason.
		if err := g.sameFiles(ctx, incS1Img, incS2Img, false); err != nil {
			return err
		}
		return g.sameFiles(ctx, incFull, incS2Img, true)
	}); err != nil {
		return err
	}
	if err := g.step("e2fsck -fn of the backup", func() error { return g.fsckClean(ctx, incFull) }); err != nil {
		return err
	}
	if err := g.step("s2 mounted ro holds set B and the changes to A", func() error {
		if err := g.mount(ctx, nbd1, snapMnt, "ro"); err != nil {
			return err
		}
		if err := checkTree(snapMnt, origin); err != nil {
			return err
		}
		if err := g.umount(ctx, snapMnt); err != nil {
			return err
		}
		return g.detach(ctx, nbd1)
	}); err != nil {
		return err
	}
	if err := g.step("status: s2 diffs against s1", func() error {
		out, err := g.nbdsnap(ctx, "status", "s2", "--json")
		if err != nil {
			return err
		}
		var st struct {
			State     string   `json:"state"`
			DiffBases []string `json:"diff_bases"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return fmt.Errorf("status s2 --json: %w\n%s", err, out)
		}
		if st.State != "valid" || len(st.DiffBases) != 1 || st.DiffBases[0] != "s1" {
			return fmt.Errorf("s2: state %q, diff_bases %q; want valid and [s1]", st.State, st.DiffBases)
		}
		return nil
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, origin); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	if err := g.finish(ctx, d, "s2", "s1"); err != nil {
		return err
	}
	for _, f := range []string{incFull, incS1Img, incS2Img} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}
