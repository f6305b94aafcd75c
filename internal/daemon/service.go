package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// The Daemon is the control.Service of its control socket.
var _ control.Service = (*Daemon)(nil)

// Create takes a snapshot. Either it succeeds completely (store created,
// copy-on-write established, record durable in the state directory, export
// served) or it changes nothing: every step done is undone before the error
// is returned.
//
// The record is written before the store exists: a crash between the two
// leaves a record whose store cannot be reopened, which the restarted
// daemon reports as an invalid snapshot, rather than a store file nobody
// knows about.
func (d *Daemon) Create(ctx context.Context, req control.CreateRequest) (control.SnapshotInfo, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.checkCreate(req); err != nil {
		return control.SnapshotInfo{}, err
	}
	rec := snapRecord{
		Name:        req.Name,
		BackingPath: req.BackingPath,
		ClusterSize: req.ClusterSize,
		Transient:   req.Transient,
		MaxSize:     req.MaxSize,
		Created:     time.Now().UTC(),
	}
	var undo []func()
	fail := func(err error) (control.SnapshotInfo, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		d.log.Warn("create refused", "snapshot", req.Name, "err", err)
		return control.SnapshotInfo{}, err
	}

	if d.state != nil {
		if err := d.state.put(rec); err != nil {
			return fail(err)
		}
		undo = append(undo, func() {
			if err := d.state.remove(req.Name); err != nil {
				d.log.Error("undo create: remove state record", "snapshot", req.Name, "err", err)
			}
		})
	}
	b, err := createBacking(req.BackingPath)
	if err != nil {
		return fail(backingError(req.BackingPath, err))
	}
	store := b.f
	undo = append(undo, func() {
		store.Close()
		if err := removeBacking(req.BackingPath); err != nil {
			d.log.Error("undo create: remove backing file", "path", req.BackingPath, "err", err)
		}
	})
	snap, err := d.engine.Create(ctx, store, cow.SnapshotOptions{
		Name:        req.Name,
		ClusterSize: req.ClusterSize,
		Transient:   req.Transient,
		MaxSize:     req.MaxSize,
		CacheBytes:  d.cfg.CacheBytes,
		OriginID:    d.originID,
	})
	if err != nil {
		return fail(backingError(req.BackingPath, err))
	}
	// From here the engine owns the store and closes it in Clear.
	undo[len(undo)-1] = func() {
		if err := d.engine.Clear(req.Name); err != nil {
			d.log.Error("undo create: clear", "snapshot", req.Name, "err", err)
		}
		if err := removeBacking(req.BackingPath); err != nil {
			d.log.Error("undo create: remove backing file", "path", req.BackingPath, "err", err)
		}
	}
	// Record what the engine chose (the cluster size may have been raised
	// for a large origin) and the store's creation time, so that a snapshot
	// that is gone after a restart is still described right.
	if i := snap.Info(); d.state != nil && (rec.ClusterSize != i.ClusterSize || !rec.Created.Equal(i.Created)) {
		rec.ClusterSize, rec.Created = i.ClusterSize, i.Created.UTC()
		if err := d.state.put(rec); err != nil {
			return fail(err)
		}
	}
	if err := d.export(snap); err != nil {
		return fail(err)
	}
	e := &entry{rec: rec, snap: snap, served: true}
	info := d.info(e)
	d.mu.Lock()
	d.snaps[req.Name] = e
	d.mu.Unlock()
	d.log.Info("snapshot ready", "snapshot", req.Name, "backing", req.BackingPath,
		"persistent", !req.Transient, "cluster_size", info.ClusterSize)
	if d.state == nil && !req.Transient {
		d.log.Warn("no --state-dir: this persistent snapshot will not be reopened after a daemon restart",
			"snapshot", req.Name)
	}
	return info, nil
}

// checkCreate validates a request before anything is touched.
func (d *Daemon) checkCreate(req control.CreateRequest) error {
	if err := ValidName(req.Name); err != nil {
		return fmt.Errorf("%w: snapshot %w", control.ErrInvalid, err)
	}
	if req.Name == d.cfg.Name {
		return fmt.Errorf("%w: %q is the origin export's name", control.ErrExists, req.Name)
	}
	d.mu.Lock()
	_, exists := d.snaps[req.Name]
	d.mu.Unlock()
	if exists {
		return fmt.Errorf("snapshot %q %w", req.Name, control.ErrExists)
	}
	if !filepath.IsAbs(req.BackingPath) {
		return fmt.Errorf("%w: backing path %q is not absolute", control.ErrInvalid, req.BackingPath)
	}
	if cs := req.ClusterSize; cs != 0 && (cs < cow.MinClusterSize || cs > cow.MaxClusterSize || cs&(cs-1) != 0) {
		return fmt.Errorf("%w: cluster size %d is not a power of two between %d and %d",
			control.ErrInvalid, cs, cow.MinClusterSize, cow.MaxClusterSize)
	}
	if req.MaxSize < 0 {
		return fmt.Errorf("%w: max size %d is negative", control.ErrInvalid, req.MaxSize)
	}
	if fi, err := os.Stat(req.BackingPath); err == nil && !isBlockDevice(fi) {
		return fmt.Errorf("backing file %s %w", req.BackingPath, control.ErrExists)
	}
	return nil
}

func isBlockDevice(fi os.FileInfo) bool {
	return fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
}

// backing is an open backing store and how to undo its creation.
type backing struct {
	f      vfs.File
	device bool // a block device: it was there before and stays
}

// createBacking opens the backing store of a new snapshot: a new regular
// file (O_EXCL, so that nothing existing is overwritten), or an existing
// block device that the user named explicitly, opened O_EXCL so that it is
// not mounted or used by another snapshot.
func createBacking(path string) (backing, error) {
	if fi, err := os.Stat(path); err == nil && isBlockDevice(fi) {
		f, err := openDevice(path)
		return backing{f: f, device: true}, err
	}
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	return backing{f: f}, err
}

// openBacking opens an existing backing store (a restart's reopen).
func openBacking(path string) (vfs.File, error) {
	if fi, err := os.Stat(path); err == nil && isBlockDevice(fi) {
		return openDevice(path)
	}
	return vfs.OS{}.OpenFile(path, os.O_RDWR, 0)
}

func openDevice(path string) (vfs.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_EXCL|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return vf, nil
}

// removeBacking deletes a snapshot's backing file. A block device is left
// alone: it belongs to the user, who named it.
func removeBacking(path string) error {
	if fi, err := os.Stat(path); err == nil && isBlockDevice(fi) {
		return nil
	}
	if err := (vfs.OS{}).Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// backingError turns a failure to create the backing store into the line a
// user needs.
func backingError(path string, err error) error {
	switch {
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("backing path %s is on a read-only filesystem", path)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("no space for backing store %s: filesystem full", path)
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("backing device %s is in use (mounted, or opened exclusively by another program)", path)
	case errors.Is(err, syscall.EEXIST):
		return fmt.Errorf("backing file %s %w", path, control.ErrExists)
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("%w: directory of backing path %s does not exist", control.ErrInvalid, path)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("backing path %s: permission denied", path)
	case errors.Is(err, cow.ErrBadOption):
		return fmt.Errorf("%w: %w", control.ErrInvalid, err)
	case errors.Is(err, cow.ErrExists):
		return fmt.Errorf("%w: %w", control.ErrExists, err)
	}
	return fmt.Errorf("create backing store %s: %w", path, err)
}

// export serves a snapshot read-only under its own name.
func (d *Daemon) export(snap *cow.Snapshot) error {
	info := snap.Info()
	err := d.srv.AddExport(nbdsrv.Export{
		Name:        snap.Name(),
		Description: fmt.Sprintf("nbdsnap snapshot of %s taken %s", d.cfg.Name, info.Created.UTC().Format(time.RFC3339)),
		Size:        snap.Size(),
		Backend:     snap,
		ReadOnly:    true,
		MultiConn:   true,
	})
	if errors.Is(err, nbdsrv.ErrExportExists) {
		return fmt.Errorf("export %q %w", snap.Name(), control.ErrExists)
	}
	if err != nil {
		return fmt.Errorf("export snapshot %q: %w", snap.Name(), err)
	}
	return nil
}

// Clear removes a snapshot: its export (refused with ErrBusy while a client
// has it open, unless force), its copy-on-write, its store file and its
// record. The store goes before the record, so that a crash in between
// leaves a record the restarted daemon reports as gone, not a store file
// nobody knows about.
func (d *Daemon) Clear(ctx context.Context, name string, force bool) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	e, ok := d.snaps[name]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	}
	if e.served {
		err := d.srv.RemoveExport(name, force)
		if errors.Is(err, nbdsrv.ErrExportBusy) {
			return fmt.Errorf("snapshot %q is open by %d NBD client(s); disconnect them or use --force: %w",
				name, d.srv.OpenConns(name), control.ErrBusy)
		}
		if err != nil && !errors.Is(err, nbdsrv.ErrNoExport) {
			return fmt.Errorf("clear %q: remove export: %w", name, err)
		}
		d.mu.Lock()
		e.served = false
		d.mu.Unlock()
	}
	if e.snap != nil {
		if err := d.engine.Clear(name); err != nil && !errors.Is(err, cow.ErrNotFound) {
			// The writer failed to stop cleanly; the snapshot is going
			// away regardless, so log and carry on removing it.
			d.log.Warn("clear: stop writer", "snapshot", name, "err", err)
		}
		d.mu.Lock()
		e.snap = nil
		e.gone = "being cleared"
		d.mu.Unlock()
	}
	if err := removeBacking(e.rec.BackingPath); err != nil {
		return fmt.Errorf("clear %q: remove backing file: %w", name, err)
	}
	if d.state != nil {
		if err := d.state.remove(name); err != nil {
			return fmt.Errorf("clear %q: %w", name, err)
		}
	}
	d.mu.Lock()
	delete(d.snaps, name)
	d.mu.Unlock()
	d.log.Info("snapshot cleared", "snapshot", name, "forced", force)
	return nil
}

// reopenAll brings back the snapshots recorded in the state directory. A
// persistent one whose store reopens is served again; anything else (a
// transient snapshot, whose copied data lived partly in memory; a snapshot
// whose record says it turned invalid; a store that is missing, damaged or
// of another origin) is kept as an invalid entry with the reason, never
// served, until the user clears it.
func (d *Daemon) reopenAll(ctx context.Context) error {
	recs, err := d.state.records()
	if err != nil {
		return err
	}
	for _, r := range recs {
		e := &entry{rec: r}
		if r.Transient {
			e.gone = "transient snapshot: it did not survive the daemon restart"
		} else if r.Invalid {
			// The store is not even opened: its header may still say
			// valid (recordInvalid), and the origin has moved on
			// without copying for it.
			e.gone = r.Reason
			if e.gone == "" {
				e.gone = "invalid"
			}
		} else if snap, err := d.reopen(ctx, r); err != nil {
			e.gone = "cannot reopen after restart: " + err.Error()
		} else {
			e.snap = snap
			if info := snap.Info(); !info.Valid {
				// Served anyway: every read answers EIO, which is the
				// truth about an invalid snapshot.
				d.log.Warn("reopened snapshot is invalid", "snapshot", r.Name, "reason", info.Reason)
			}
			if err := d.export(snap); err != nil {
				return err
			}
			e.served = true
		}
		if e.gone != "" {
			d.log.Warn("snapshot not served", "snapshot", r.Name, "reason", e.gone)
		} else {
			d.log.Info("snapshot reopened", "snapshot", r.Name, "backing", r.BackingPath)
		}
		d.snaps[r.Name] = e
	}
	return nil
}

// recordInvalid is the engine's RecordInvalid: it marks the snapshot's
// record invalid, so that a restart does not serve the snapshot although
// its store's header may say valid (writing the header may have failed).
// It runs on the snapshot's writer, which Create and Clear may be waiting
// for with opMu held: it takes only the state directory's lock.
func (d *Daemon) recordInvalid(name, reason string) error {
	if err := d.state.markInvalid(name, reason); err != nil {
		return fmt.Errorf("record invalid snapshot %q: %w", name, err)
	}
	return nil
}

func (d *Daemon) reopen(ctx context.Context, r snapRecord) (*cow.Snapshot, error) {
	f, err := openBacking(r.BackingPath)
	if err != nil {
		return nil, err
	}
	snap, err := d.engine.Reopen(ctx, f, cow.ReopenOptions{OriginID: d.originID, CacheBytes: d.cfg.CacheBytes})
	if err != nil {
		f.Close()
		return nil, err
	}
	if snap.Name() != r.Name {
		d.engine.Clear(snap.Name())
		return nil, fmt.Errorf("store %s holds snapshot %q, not %q", r.BackingPath, snap.Name(), r.Name)
	}
	return snap, nil
}

// Status describes the daemon and every snapshot, oldest first.
func (d *Daemon) Status(ctx context.Context) (control.Status, error) {
	st := control.Status{
		Name:       d.cfg.Name,
		Origin:     d.cfg.Origin,
		OriginSize: d.engine.Size(),
		Version:    d.cfg.Version,
		PID:        os.Getpid(),
		Listen:     d.addrs,
		StateDir:   d.cfg.StateDir,
		Started:    d.started,
		Conns:      d.srv.OpenConns(d.cfg.Name),
		Snapshots:  []control.SnapshotInfo{},
	}
	// Copies, taken under mu: Clear changes an entry's fields under mu.
	d.mu.Lock()
	entries := make([]entry, 0, len(d.snaps))
	for _, e := range d.snaps {
		entries = append(entries, *e)
	}
	d.mu.Unlock()
	sort.Slice(entries, func(i, j int) bool {
		if !entries[i].rec.Created.Equal(entries[j].rec.Created) {
			return entries[i].rec.Created.Before(entries[j].rec.Created)
		}
		return entries[i].rec.Name < entries[j].rec.Name
	})
	for i := range entries {
		st.Snapshots = append(st.Snapshots, d.info(&entries[i]))
	}
	return st, nil
}

// Snapshot describes one snapshot.
func (d *Daemon) Snapshot(ctx context.Context, name string) (control.SnapshotInfo, error) {
	d.mu.Lock()
	e, ok := d.snaps[name]
	var c entry
	if ok {
		c = *e
	}
	d.mu.Unlock()
	if !ok {
		return control.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	}
	return d.info(&c), nil
}

// info describes an entry; e must be a copy taken under mu, or an entry no
// other goroutine can reach yet.
func (d *Daemon) info(e *entry) control.SnapshotInfo {
	out := control.SnapshotInfo{
		Name:        e.rec.Name,
		Origin:      d.cfg.Name,
		Created:     e.rec.Created,
		Persistent:  !e.rec.Transient,
		ClusterSize: e.rec.ClusterSize,
		BackingPath: e.rec.BackingPath,
		MaxSize:     e.rec.MaxSize,
		Size:        d.engine.Size(),
		Served:      e.served,
	}
	if e.served {
		out.Conns = d.srv.OpenConns(e.rec.Name)
	}
	snap := e.snap
	if snap == nil {
		out.State = control.StateInvalid
		out.Reason = e.gone
		if fi, err := os.Stat(e.rec.BackingPath); err == nil {
			out.BackingBytes = fi.Size()
		}
		return out
	}
	i := snap.Info()
	out.UUID = i.UUID
	out.Created = i.Created
	out.Persistent = i.Persistent
	out.ClusterSize = i.ClusterSize
	out.ClustersTotal = i.ClustersTotal
	out.ClustersCopied = i.ClustersCopied
	out.BackingBytes = i.StoreBytes
	out.CreatePauseMicros = i.CreatePause.Microseconds()
	out.Size = snap.Size()
	out.State = control.StateValid
	if !i.Valid {
		out.State = control.StateInvalid
		out.Reason = i.Reason
	}
	out.Stats = control.Stats{
		CowCalls:       i.Stats.CowCalls,
		ClustersCopied: i.Stats.ClustersCopied,
		CacheFullWaits: i.Stats.CacheFullWaits,
		MapReads:       i.Stats.MapReads,
		MapWrites:      i.Stats.MapWrites,
		BytesCopied:    i.Stats.BytesCopied,
		Batches:        i.Stats.Batches,
		Syncs:          i.Stats.Syncs,
	}
	return out
}

// originBackend serves the engine as the origin export. It adapts the
// engine's Zero to nbdsrv's: a zero through the engine may have to copy the
// old clusters into every snapshot first, so it is never promised fast.
type originBackend struct{ *cow.Engine }

func (b originBackend) Zero(ctx context.Context, off, length int64, flags nbdsrv.ZeroFlags) error {
	if flags.Fast {
		return nbdsrv.ErrNotFast
	}
	return b.Engine.Zero(ctx, off, length, flags.FUA)
}
