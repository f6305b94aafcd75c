package daemon

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// Changed blocks over NBD, in QEMU's form: the context
// "qemu:dirty-bitmap:B" on the export of snapshot S says which blocks
// changed between B's create instant and S's; on the origin export, which
// changed since B's. The lists are computed afresh at every negotiation,
// so a context appears when its base can answer exactly and is gone once it
// cannot (package cow, dirty.go); a connection that selected one keeps it
// and gets an error, never a wrong answer, after it went.

const dirtyBitmapPrefix = "qemu:dirty-bitmap:"

// changedFunc answers for one base: see cow.Snapshot.Changed.
type changedFunc func(ctx context.Context, base string, off, length int64) ([]cow.ChangedRun, error)

// dirtyContext is one qemu:dirty-bitmap:BASE context.
type dirtyContext struct {
	base    string
	changed changedFunc
}

func (c dirtyContext) Name() string { return dirtyBitmapPrefix + c.base }

func (c dirtyContext) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	runs, err := c.changed(ctx, c.base, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbdsrv.Extent, len(runs))
	for i, r := range runs {
		out[i].Length = r.Length
		if r.Changed {
			out[i].Flags = nbdsrv.ExtentDirty
		}
	}
	return out, nil
}

// dirtyContexts turns bases into contexts answered by changed.
func dirtyContexts(bases []cow.Base, changed changedFunc) []nbdsrv.MetaContext {
	out := make([]nbdsrv.MetaContext, len(bases))
	for i, b := range bases {
		out[i] = dirtyContext{base: b.Name, changed: changed}
	}
	return out
}

// Diff lists the ranges that changed between base's create instant and
// target's (a snapshot, or the origin when target is "" or the daemon's
// name), as the qemu:dirty-bitmap context would report them.
func (d *Daemon) Diff(ctx context.Context, base, target string) (control.Diff, error) {
	if err := d.ready(); err != nil {
		return control.Diff{}, err
	}
	if target == "" {
		target = d.cfg.Name
	}
	var changed changedFunc
	var bases []cow.Base
	if target == d.cfg.Name {
		changed, bases = d.engine.ChangedSince, d.engine.Tracked()
	} else {
		snap, ok := d.engine.Snapshot(target)
		if !ok {
			d.mu.Lock()
			_, listed := d.snaps[target]
			d.mu.Unlock()
			if listed { // not open: invalid since a restart
				return control.Diff{}, d.noBase(base, target)
			}
			return control.Diff{}, fmt.Errorf("snapshot %q: %w", target, control.ErrNotFound)
		}
		changed, bases = snap.Changed, snap.Bases()
	}
	out := control.Diff{Base: base, Target: target, Ranges: []control.Range{}}
	for _, b := range bases {
		if b.Name == base {
			out.Granularity = b.Granularity
		}
	}
	if out.Granularity == 0 {
		return control.Diff{}, d.noBase(base, target)
	}
	size := d.engine.Size()
	for off := int64(0); off < size; {
		runs, err := changed(ctx, base, off, size-off)
		if err != nil {
			if errors.Is(err, cow.ErrInvalid) || errors.Is(err, cow.ErrNoBase) {
				return control.Diff{}, fmt.Errorf("%w: %v", control.ErrInvalid, err)
			}
			return control.Diff{}, err
		}
		for _, r := range runs {
			if r.Changed {
				if k := len(out.Ranges) - 1; k >= 0 && out.Ranges[k].Offset+out.Ranges[k].Length == off {
					out.Ranges[k].Length += r.Length
				} else {
					out.Ranges = append(out.Ranges, control.Range{Offset: off, Length: r.Length})
				}
				out.ChangedBytes += r.Length
			}
			off += r.Length
		}
	}
	return out, nil
}

// noBase explains why target cannot report changes since base.
func (d *Daemon) noBase(base, target string) error {
	d.mu.Lock()
	b, okB := d.snaps[base]
	t, okT := d.snaps[target]
	var be, te entry
	if okB {
		be = *b
	}
	if okT {
		te = *t
	}
	d.mu.Unlock()
	qb, qt := strconv.Quote(base), strconv.Quote(target)
	why := "it was not a valid persistent snapshot or bookmark when " + qt + " was created"
	switch {
	case !okB:
		return fmt.Errorf("snapshot %q: %w", base, control.ErrNotFound)
	case base == target:
		why = "they are the same snapshot"
	case be.rec.Transient:
		why = qb + " is transient (its changes are not kept across a restart)"
	case be.snap == nil || !be.snap.Info().Valid:
		why = qb + " is invalid"
	case okT && te.rec.Bookmark:
		why = qt + " is a bookmark, which has no image to compare"
	case okT && te.rec.Transient:
		why = qt + " is transient"
	case okT && (te.snap == nil || !te.snap.Info().Valid):
		why = qt + " is invalid"
	case okT && !be.rec.Created.Before(te.rec.Created):
		why = qb + " was taken after " + qt
	}
	return fmt.Errorf("%w: %s cannot report exact changes since %s: %s (`nbdsnap status` lists each snapshot's diff bases)",
		control.ErrInvalid, qt, qb, why)
}

// diffBases names the bases of a snapshot, for status.
func diffBases(snap *cow.Snapshot) []string {
	out := []string{}
	for _, b := range snap.Bases() {
		out = append(out, b.Name)
	}
	return out
}
