package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// A rollback's durable record is its progress file in the state directory
// (the format is in backstore's format.go, "Rollback progress"; the engine's
// side in cow's rollback.go). Its life:
//
//  1. Rollback creates the file empty and syncs the directory, then the
//     engine writes it; the header's sync is the rollback instant. A crash
//     before it leaves an empty or zero-headed file, which the next start
//     removes: the command never answered, and nothing was restored.
//  2. While the file holds an incomplete rollback, a start reopens the
//     source snapshot (even if its record says invalid: its store still
//     holds what the rollback restores, checked by checksum) and resumes
//     before it serves the origin. If it cannot (the store is missing, not
//     the snapshot's, or the file is damaged), the daemon does not start:
//     serving the origin would show a mix of old and restored content.
//  3. When the copy is complete and recorded, the engine lets go of the
//     file, the source is cleared if consume was asked, and the file is
//     removed. A crash in between leaves a complete file, and the next
//     start finishes the same way (the source, if still there, is served
//     as usual).
const progressFile = "rollback.progress"

func (d *Daemon) progressPath() string { return filepath.Join(d.cfg.StateDir, progressFile) }

// Rollback starts rolling the origin back to snapshot name: from its
// answer on, the origin export shows the snapshot's content, and the copy
// goes on in the background (Status reports it; see progressFile for what
// a crash does).
func (d *Daemon) Rollback(ctx context.Context, name string, req control.RollbackRequest) (control.RollbackStatus, error) {
	if err := d.ready(); err != nil {
		return control.RollbackStatus{}, err
	}
	if req.Rate < 0 {
		return control.RollbackStatus{}, fmt.Errorf("%w: rate %d is negative", control.ErrInvalid, req.Rate)
	}
	if err := d.lockOps(ctx); err != nil {
		return control.RollbackStatus{}, err
	}
	defer d.unlockOps()
	c, ok := d.entry(name)
	switch {
	case !ok:
		return control.RollbackStatus{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	case c.rec.Bookmark:
		return control.RollbackStatus{}, fmt.Errorf("%w: %q is a bookmark: it keeps no image to roll back to", control.ErrInvalid, name)
	case c.rec.Transient:
		return control.RollbackStatus{}, fmt.Errorf("%w: %q is transient: a rollback to it could not survive a crash in the middle", control.ErrInvalid, name)
	case c.snap == nil || !c.snap.Info().Valid:
		return control.RollbackStatus{}, fmt.Errorf("%w: %q is invalid (%s): its image is not known to be right", control.ErrInvalid, name, d.info(&c).Reason)
	}
	if ri, ok := d.engine.RollbackInfo(); ok {
		if ri.State == cow.RollbackFailed {
			return control.RollbackStatus{}, fmt.Errorf("the rollback to %q failed (%s) and is not over: a restart of the daemon tries again: %w", ri.Snapshot, ri.Err, control.ErrBusy)
		}
		return control.RollbackStatus{}, fmt.Errorf("a rollback to %q is under way: %w", ri.Snapshot, control.ErrBusy)
	}
	if n := d.srv.OpenConns(d.cfg.Name); n > 0 && !req.Force {
		return control.RollbackStatus{}, fmt.Errorf("the origin export %q is open by %d NBD client(s), whose caches (a mounted file system's above all) would go stale: unmount, detach them (nbd-client -d /dev/nbdX) and try again, or use --force: %w",
			d.cfg.Name, n, control.ErrBusy)
	}
	f, err := d.newProgressFile()
	if err != nil {
		return control.RollbackStatus{}, err
	}
	d.crashpoint("rollback:file")
	opts := cow.RollbackOptions{Consume: req.Consume, Rate: req.Rate}
	if err := d.engine.Rollback(ctx, name, f, opts); err != nil {
		f.Close()
		if rerr := d.removeProgress(); rerr != nil {
			d.log.Error("a rollback that did not start left its progress file", "err", rerr)
		}
		switch {
		case errors.Is(err, cow.ErrRollback):
			return control.RollbackStatus{}, fmt.Errorf("%w: %v", control.ErrBusy, err)
		case errors.Is(err, cow.ErrInvalid), errors.Is(err, cow.ErrBookmark), errors.Is(err, cow.ErrBadOption):
			return control.RollbackStatus{}, fmt.Errorf("%w: %v", control.ErrInvalid, err)
		case errors.Is(err, cow.ErrNotFound):
			return control.RollbackStatus{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
		}
		return control.RollbackStatus{}, fmt.Errorf("rollback to %q: %w", name, err)
	}
	d.crashpoint("rollback:started")
	d.log.Info("rollback started: the origin shows the snapshot", "snapshot", name, "consume", req.Consume, "rate", req.Rate, "forced", req.Force)
	d.watchRollback()
	st, _ := d.rollbackStatus()
	return st, nil
}

// newProgressFile creates the empty progress file, durably. A file left by
// a rollback that ended is removed first; one of a rollback that has not
// refuses.
func (d *Daemon) newProgressFile() (vfs.File, error) {
	path := d.progressPath()
	if _, err := os.Stat(path); err == nil {
		if done, err := d.progressLeftover(); err != nil {
			return nil, err
		} else if !done {
			return nil, fmt.Errorf("%s records a rollback that did not finish; restart the daemon to resume it: %w", path, control.ErrBusy)
		}
	}
	osf, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("rollback progress: %w", err)
	}
	f, err := vfs.NewOSFile(osf)
	if err == nil {
		err = syncDir(d.cfg.StateDir)
	}
	if err != nil {
		osf.Close()
		os.Remove(path)
		return nil, fmt.Errorf("rollback progress: %w", err)
	}
	return f, nil
}

// progressLeftover removes a progress file whose rollback is over
// (complete, or never committed) and reports whether it did.
func (d *Daemon) progressLeftover() (bool, error) {
	p, err := d.openProgress()
	switch {
	case err != nil:
		return false, err
	case p == nil:
		return true, nil // it was never committed, and is gone now
	}
	complete := p.Complete()
	p.Close()
	if !complete {
		return false, nil
	}
	return true, d.removeProgress()
}

// openProgress opens the progress file. It returns nil and no error when
// there is none, or when it holds no committed rollback (then it is
// removed); an error when it cannot be read or is damaged.
func (d *Daemon) openProgress() (*backstore.Progress, error) {
	path := d.progressPath()
	osf, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("rollback progress: %w", err)
	}
	f, err := vfs.NewOSFile(osf)
	if err != nil {
		osf.Close()
		return nil, fmt.Errorf("rollback progress: %w", err)
	}
	p, err := backstore.OpenProgress(f)
	if errors.Is(err, backstore.ErrNoProgress) {
		f.Close()
		d.log.Warn("removing the progress file of a rollback a crash interrupted before it started", "file", path)
		return nil, d.removeProgress()
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

func (d *Daemon) removeProgress() error {
	if err := os.Remove(d.progressPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rollback progress: %w", err)
	}
	return syncDir(d.cfg.StateDir)
}

// watchRollback finishes the engine's rollback once its copy ended
// (finishRollback), unless the daemon stops first.
func (d *Daemon) watchRollback() {
	done := d.engine.RollbackDone()
	if done == nil {
		return
	}
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		select {
		case <-done:
		case <-d.bgCtx.Done():
			return
		}
		ri, ok := d.engine.RollbackInfo()
		if !ok || ri.State != cow.RollbackComplete {
			if ok && ri.State == cow.RollbackFailed {
				d.log.Error("rollback failed; the origin shows the snapshot where the copy failed, and a restart tries again", "snapshot", ri.Snapshot, "err", ri.Err)
			}
			return
		}
		if err := d.lockOps(d.bgCtx); err != nil {
			return
		}
		defer d.unlockOps()
		// Status shows this rollback as running until it is done:
		// finishRollback ends the engine's rollback (which Status reads
		// first) before it clears the source and removes the progress
		// file, and a `rollback --wait` polling in between would
		// otherwise find no rollback, or the one before, and give up.
		st := toStatus(ri)
		d.mu.Lock()
		d.lastRollback = &st
		d.mu.Unlock()
		if err := d.finishRollback(ri.Snapshot, ri.UUID, ri.Consume); err != nil {
			d.log.Error("rollback complete, but it could not be finished; a restart finishes it", "snapshot", ri.Snapshot, "err", err)
			failed := toStatus(ri)
			failed.State = control.RollbackFailed
			failed.Error = "the copy is complete, but the rollback could not be finished (a restart of the daemon finishes it): " + err.Error()
			d.mu.Lock()
			d.lastRollback = &failed
			d.mu.Unlock()
			return
		}
		fin := toStatus(ri)
		fin.State, fin.Finished, fin.RemainingBytes = control.RollbackDone, time.Now(), 0
		d.mu.Lock()
		d.lastRollback = &fin
		d.mu.Unlock()
	}()
}

// finishRollback ends a complete rollback: the engine lets go of the
// progress file, the source (store uuid) is cleared if consume was asked,
// and the file is removed. The caller holds the ops lock.
func (d *Daemon) finishRollback(name, uuid string, consume bool) error {
	if err := d.engine.EndRollback(); err != nil {
		return err
	}
	d.crashpoint("rollback:ended")
	if consume {
		d.mu.Lock()
		e, ok := d.snaps[name]
		ok = ok && e.rec.UUID == uuid
		d.mu.Unlock()
		if ok {
			if _, err := d.clear(name, true); err != nil {
				return fmt.Errorf("consume %q: %w", name, err)
			}
		}
	}
	d.crashpoint("rollback:consumed")
	if err := d.removeProgress(); err != nil {
		return err
	}
	d.log.Info("rollback finished", "snapshot", name, "consumed", consume)
	return nil
}

// rollbackStatus describes the rollback under way, or the last one.
func (d *Daemon) rollbackStatus() (control.RollbackStatus, bool) {
	if ri, ok := d.engine.RollbackInfo(); ok {
		return toStatus(ri), true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lastRollback != nil {
		return *d.lastRollback, true
	}
	return control.RollbackStatus{}, false
}

func toStatus(ri cow.RollbackInfo) control.RollbackStatus {
	st := control.RollbackStatus{
		Snapshot:       ri.Snapshot,
		UUID:           ri.UUID,
		State:          control.RollbackRunning,
		Error:          ri.Err,
		Started:        ri.Started,
		Consume:        ri.Consume,
		Rate:           ri.Rate,
		TotalBytes:     ri.TotalBytes,
		RemainingBytes: ri.RemainingBytes,
	}
	if ri.State == cow.RollbackFailed {
		st.State = control.RollbackFailed
	}
	return st
}

// refuseDuringRollback refuses what a rollback under way forbids: creating
// snapshots, and clearing or bookmarking its source.
func (d *Daemon) refuseDuringRollback(what, name string) error {
	ri, ok := d.engine.RollbackInfo()
	switch {
	case !ok:
		return nil
	case what == "create":
		return fmt.Errorf("a rollback to %q is under way: snapshots can be created once it is complete (nbdsnap status shows it): %w", ri.Snapshot, control.ErrBusy)
	case name == ri.Snapshot:
		return fmt.Errorf("the origin is being rolled back to %q: it cannot be %s before the rollback is complete: %w", name, what, control.ErrBusy)
	}
	return nil
}
