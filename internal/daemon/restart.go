package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/devinfo"
)

// reopenAll settles every record of the state directory before the origin
// is served: it finishes what a crash interrupted, reopens what can be
// served, and records durably why anything else cannot be. The guarantee it
// keeps: a persistent snapshot the origin is served without (its store
// missing, unreadable, not its own, or its record out of date) is marked
// invalid in its record, and in its store's header where that store is
// reachable, before the origin takes a single write; if the record cannot be
// written, the daemon does not start.
//
// Per record:
//
//   - damaged (does not parse, newer version): listed with the reason and
//     what to do; never served; its store is not looked for (nothing says
//     which it is). Its session stays old, so a record repaired by hand
//     later is found out of date and invalid: the origin was served without
//     copy-on-write for it meanwhile.
//   - creating: the create never answered success: rolled back (its
//     staging file deleted, its store retired if it proves to be ours, the
//     record removed).
//   - clearing: the clear is finished.
//   - transient, or marked invalid: listed invalid, not served; an invalid
//     one's store header is marked too, if it is reachable now.
//   - out of date (session): marked invalid.
//   - origin identity differs: not served, listed invalid with both
//     identities, unless the user said the origin moved. The record is not
//     marked: the snapshot's own origin is not being served, so nothing
//     happens to it, and it is served again once that origin is back.
//   - the same origin with another size: marked invalid (and its header):
//     that origin is served now, without copy-on-write for the snapshot.
//   - store missing, unreadable, not this snapshot's (UUID), or not
//     reopenable: marked invalid (and its header, if the store is ours).
//   - otherwise reopened, served, and its record stamped with this session.
//
// A rollback under way (rollback.go's progressFile) is resumed once its
// source is reopened, whether that source's record says valid or not; if
// it cannot be, the daemon does not start. A complete one is finished.
//
// Then origin.json records this session as the last to serve the origin.
func (d *Daemon) reopenAll(ctx context.Context) (err error) {
	loads, err := d.state.records()
	if err != nil {
		return err
	}
	prog, err := d.openProgress()
	if err != nil {
		return fmt.Errorf("the rollback progress cannot be read (%w): the origin is not served, since it may be half rolled back; move the file aside only if you accept that", err)
	}
	var resume *backstore.Progress
	if prog != nil {
		if prog.Complete() {
			prog.Close()
		} else {
			resume = prog
			d.resumeUUID = prog.Info().UUID.String()
			defer func() {
				if err != nil {
					resume.Close()
				}
			}()
		}
	}
	prev := d.origin.Session
	d.session = prev + 1
	if d.cfg.WaitStores > 0 {
		d.waitStores(ctx, loads)
	}
	for _, l := range loads {
		// A start interrupted (SIGTERM while waiting for stores) serves
		// nothing, so it must not record anything as missed either.
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("start interrupted before serving the origin: %w", err)
		}
		e, err := d.settle(ctx, l, prev)
		if err != nil {
			return err
		}
		if e == nil {
			continue
		}
		if !e.served {
			d.log.Warn("snapshot not served", "snapshot", e.rec.Name, "reason", e.gone)
		} else {
			d.log.Info("snapshot reopened", "snapshot", e.rec.Name, "backing", e.rec.BackingPath)
		}
		d.mu.Lock()
		d.snaps[e.rec.Name] = e
		d.mu.Unlock()
	}
	if prog != nil {
		info := prog.Info()
		name := "(cleared)"
		for _, l := range loads {
			if l.damaged == nil && l.rec.UUID == info.UUID.String() {
				name = l.rec.Name
			}
		}
		if resume != nil {
			if err := d.engine.ResumeRollback(resume); err != nil {
				return fmt.Errorf("a rollback to snapshot %s (store %s) was under way and cannot resume (%w): the origin is not served, since it would show a mix of its old content and the snapshot's; make the snapshot's store available (mount its file system; --wait-stores waits for it) and start again",
					name, info.UUID, err)
			}
			d.log.Warn("resuming the rollback a stop interrupted", "snapshot", name)
		} else if err := d.finishRollback(name, info.UUID.String(), info.Consume); err != nil {
			return fmt.Errorf("a complete rollback to snapshot %s could not be finished: %w", name, err)
		}
	}
	if err := d.state.setSession(d.origin, d.session); err != nil {
		return err
	}
	d.origin.Session = d.session
	return nil
}

// settle handles one record at startup (see reopenAll) and returns the
// entry to list, or nil when the record is gone. An error means an
// invalidation could not be recorded: the daemon must not start.
func (d *Daemon) settle(ctx context.Context, l loaded, prev uint64) (*entry, error) {
	if l.damaged != nil {
		if ValidName(l.name) != nil {
			d.log.Warn("state directory: ignoring a file that is not a snapshot record", "file", l.file, "err", l.damaged)
			return nil, nil
		}
		d.log.Error("state record damaged; the snapshot is not served", "file", l.file, "err", l.damaged)
		return &entry{rec: snapRecord{Name: l.name}, file: l.file, damaged: l.damaged,
			gone: fmt.Sprintf("%v: not served; repair or remove the file, or `nbdsnap clear %s` removes the record and leaves any backing store in place", l.damaged, l.name)}, nil
	}
	r := l.rec
	switch r.Phase {
	case phaseCreating:
		if err := d.finish(r, "create was interrupted before it completed: rolled back"); err != nil {
			return &entry{rec: r, gone: fmt.Sprintf("a create interrupted by a crash could not be rolled back (%v); `nbdsnap clear %s` retries", err, r.Name)}, nil
		}
		return nil, nil
	case phaseClearing:
		if err := d.finish(r, "clear was interrupted: finished"); err != nil {
			return &entry{rec: r, gone: fmt.Sprintf("clear did not finish (%v); `nbdsnap clear %s` retries", err, r.Name)}, nil
		}
		return nil, nil
	}
	e := &entry{rec: r}
	switch {
	case r.Transient:
		e.gone = "transient snapshot: it did not survive the daemon restart"
		return e, nil
	case r.Invalid && r.UUID != d.resumeUUID:
		e.gone = r.Reason
		if e.gone == "" {
			e.gone = "invalid"
		}
		d.markStoreInvalid(r, e.gone)
		return e, nil
	case r.Session != 0 && r.Session < prev:
		return d.invalidate(e, true, fmt.Sprintf("the origin was served without copy-on-write for this snapshot: its record is of daemon session %d, but session %d served the origin (the record was unreadable then, or was restored from an older copy)", r.Session, prev))
	}
	// The source of a rollback under way that cannot be reopened stops
	// the start (the origin is not served without it), so it misses
	// nothing: it is not recorded invalid, and serves again once its
	// store is back.
	resuming := r.UUID != "" && r.UUID == d.resumeUUID
	moved := false
	if r.Origin != nil {
		if err := devinfo.Match(*r.Origin, d.ident); err != nil {
			var resized *devinfo.ResizedError
			if errors.As(err, &resized) {
				// The snapshot's own origin, resized: it is about to be
				// served without copy-on-write for this snapshot, which
				// cannot follow a resize, so the snapshot is lost for good.
				return d.invalidate(e, true, fmt.Sprintf("the origin at %s is the %s this snapshot was taken of, but its size changed from %d to %d bytes since (a snapshot cannot follow a resized origin)",
					d.cfg.Origin, resized.What, resized.From, resized.To))
			}
			if !d.cfg.AcceptMovedOrigin {
				if resuming {
					return nil, cannotResume(r, fmt.Sprintf("the origin at %s is not the one it was taken of (%v; recorded: %s; now: %s)", d.cfg.Origin, err, r.Origin, d.ident))
				}
				e.gone = fmt.Sprintf("the origin at %s is not the one this snapshot was taken of (%v; recorded: %s; now: %s): not served; if it is the same data on another device, restart with --accept-moved-origin",
					d.cfg.Origin, err, r.Origin, d.ident)
				// This session does not serve the snapshot's origin, so it
				// misses nothing: carry the record into the session.
				r.Session = d.session
				if err := d.state.put(r); err != nil {
					d.log.Warn("cannot stamp the record of a snapshot whose origin is elsewhere; the next start will take it for out of date", "snapshot", r.Name, "err", err)
				}
				return e, nil
			}
			moved = true
			d.log.Warn("origin moved: accepting it for this snapshot, as asked", "snapshot", r.Name, "recorded", r.Origin.String(), "now", d.ident.String(), "diff", err)
		}
	}

	f, err := openStore(r)
	if err != nil {
		if resuming {
			return nil, cannotResume(r, fmt.Sprintf("its backing store %s cannot be opened (%v)", r.BackingPath, err))
		}
		why := fmt.Sprintf("backing store %s could not be opened when the daemon started (%v), so the origin is served without copy-on-write for it", r.BackingPath, err)
		if errors.Is(err, os.ErrNotExist) {
			why += " (its file system not mounted yet? --wait-stores waits for it)"
		}
		return d.invalidate(e, false, why)
	}
	h, err := backstore.Identify(f)
	if err != nil || !storeMatches(r, h, d.origin.OriginID) {
		f.Close()
		if resuming {
			return nil, cannotResume(r, fmt.Sprintf("the file at %s is not its store: %s", r.BackingPath, notOurs(h, err)))
		}
		// Not ours (or not readable as ours): never written to.
		return d.invalidate(e, false, fmt.Sprintf("the file at %s is not this snapshot's store: %s", r.BackingPath, notOurs(h, err)))
	}
	snap, err := d.engine.Reopen(ctx, f, cow.ReopenOptions{OriginID: d.origin.OriginID, CacheBytes: d.cfg.CacheBytes})
	if err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("start interrupted before serving the origin: %w", ctx.Err())
		}
		if resuming {
			return nil, cannotResume(r, fmt.Sprintf("its store %s cannot be reopened (%v)", r.BackingPath, err))
		}
		return d.invalidate(e, true, "cannot reopen after restart: "+err.Error())
	}
	if info := snap.Info(); !info.Valid {
		if err := d.state.markInvalid(r.Name, info.Reason); err != nil {
			return nil, fmt.Errorf("snapshot %q: cannot record that it is invalid: %w", r.Name, err)
		}
		r.Invalid, r.Reason = true, info.Reason
		// Served anyway: every read answers EIO, which is the truth.
		d.log.Warn("reopened snapshot is invalid", "snapshot", r.Name, "reason", info.Reason)
	}
	r.Session = d.session
	if r.UUID == "" {
		r.UUID = h.UUID.String()
	}
	if r.Origin == nil || moved {
		r.Origin = &d.ident
	}
	switch info := snap.Info(); {
	case info.Bookmark && !r.Bookmark:
		// Its store became a bookmark, and a crash came before the
		// record said so: the image is gone, so the bookmark stands.
		d.log.Warn("completing a bookmark interrupted by a crash", "snapshot", r.Name)
		r.Bookmark = true
	case r.Bookmark && !info.Bookmark && info.Valid:
		// The record is written only after the store's header said
		// bookmark, so that header write was lost: make it again.
		if err := d.engine.Bookmark(r.Name); err != nil {
			d.log.Warn("a bookmark's store still holds its image and cannot drop it; it is kept as a bookmark", "snapshot", r.Name, "err", err)
		}
	}
	if err := d.state.put(r); err != nil {
		d.engine.Clear(r.Name)
		return nil, fmt.Errorf("snapshot %q: %w", r.Name, err)
	}
	e.rec, e.snap = r, snap
	if r.Bookmark {
		return e, nil
	}
	if err := d.export(snap); err != nil {
		return nil, err
	}
	e.served = true
	return e, nil
}

// cannotResume is the error that stops a start whose rollback's source r
// cannot be reopened, for why.
func cannotResume(r snapRecord, why string) error {
	return fmt.Errorf("a rollback to snapshot %s (store %s) was under way and cannot resume: %s; the origin is not served, since it would show a mix of its old content and the snapshot's: put that right (a store on a file system mounted late: --wait-stores waits for it) and start again",
		r.Name, r.UUID, why)
}

// invalidate records durably that e's snapshot is invalid, for reason, in
// its record (or fails: then the daemon must not serve the origin) and,
// with header, best effort in its store's header too (not when the store
// just proved unopenable or not the snapshot's).
func (d *Daemon) invalidate(e *entry, header bool, reason string) (*entry, error) {
	if err := d.state.markInvalid(e.rec.Name, reason); err != nil {
		return nil, fmt.Errorf("snapshot %q is invalid (%s), but that cannot be recorded (%w); serving the origin now could let a later start reopen it as valid, so the daemon stops here",
			e.rec.Name, reason, err)
	}
	e.rec.Invalid, e.rec.Reason = true, reason
	e.gone = reason
	if header {
		d.markStoreInvalid(e.rec, reason)
	}
	return e, nil
}

// markStoreInvalid records reason in the header of r's store, if the store
// is reachable and proves to be r's; anything else is left alone. Best
// effort: the record is what a restart trusts.
func (d *Daemon) markStoreInvalid(r snapRecord, reason string) {
	f, err := openStore(r)
	if err != nil {
		return
	}
	defer f.Close()
	h, err := backstore.Identify(f)
	if err != nil || !storeMatches(r, h, d.origin.OriginID) || h.State == backstore.StateInvalid && h.Reason != "" {
		return
	}
	if err := backstore.MarkInvalid(f, h.UUID, reason); err != nil {
		d.log.Warn("cannot record the invalidation in the store's header; its record has it", "snapshot", r.Name, "err", err)
		return
	}
	d.log.Info("invalidation recorded in the store's header", "snapshot", r.Name, "backing", r.BackingPath)
}

// finish completes a create's rollback or a clear that a crash interrupted:
// it retires the store (if it proves to be ours) and removes the record.
func (d *Daemon) finish(r snapRecord, what string) error {
	kept, err := retireBacking(r, d.origin.OriginID)
	if err != nil {
		return err
	}
	if err := d.state.remove(r.Name); err != nil {
		return err
	}
	d.log.Warn("snapshot "+what, "snapshot", r.Name, "backing", r.BackingPath, "kept", kept)
	return nil
}

// waitStores waits, up to --wait-stores, for the backing stores of the
// snapshots a restart is to reopen to appear (their file system mounted,
// their device attached). Those still missing then are invalidated by
// settle, as without the wait.
func (d *Daemon) waitStores(ctx context.Context, loads []loaded) {
	var want []string
	for _, l := range loads {
		r := l.rec
		if l.damaged == nil && r.Phase == phaseReady && !r.Transient && (!r.Invalid || r.UUID == d.resumeUUID) {
			want = append(want, r.BackingPath)
		}
	}
	missing := func() []string {
		var m []string
		for _, p := range want {
			if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
				m = append(m, p)
			}
		}
		return m
	}
	m := missing()
	if len(m) == 0 {
		return
	}
	d.log.Warn("waiting for backing stores to appear before serving the origin", "missing", m, "wait", d.cfg.WaitStores)
	d.setStarting(fmt.Sprintf("waiting up to %v for backing stores: %s", d.cfg.WaitStores, strings.Join(m, " ")))
	defer d.setStarting("settling its snapshots")
	notify(d.log, fmt.Sprintf("STATUS=waiting for backing stores: %s\n%s=%d", strings.Join(m, " "),
		"EXTEND_TIMEOUT_USEC", (d.cfg.WaitStores+30*time.Second).Microseconds()))
	deadline := time.NewTimer(d.cfg.WaitStores)
	defer deadline.Stop()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			d.log.Error("backing stores still missing; their snapshots turn invalid", "missing", missing(), "waited", d.cfg.WaitStores)
			return
		case <-tick.C:
			if m := missing(); len(m) == 0 {
				d.log.Info("every backing store is there")
				notify(d.log, "STATUS=backing stores found")
				return
			}
		}
	}
}
