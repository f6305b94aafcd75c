package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// The Daemon is the control.Service of its control socket.
var _ control.Service = (*Daemon)(nil)

// Create takes a snapshot. Either it succeeds completely (store created,
// copy-on-write established, record durable in the state directory, export
// served) or it leaves nothing behind: every step done is undone before the
// error is returned, and a crash at any step is undone by the next start.
//
// The steps, each durable before the next (see state.go and backing.go):
//
//  1. the record, phase "creating", with the store's UUID chosen now;
//  2. the store: a new file under its staging name, or the device after
//     checking it holds no data;
//  3. the create instant (engine.Create): header durable, copy-on-write
//     established. Until then the create may be abandoned (the request's
//     timeout, the client gone): ctx ends it;
//  4. the store file renamed to the backing path, without replacing
//     anything;
//  5. the record, phase "ready"; then the export.
//
// A crash before step 5 leaves a creating record, which the restart rolls
// back (the client was never told of success); after it, a snapshot the
// restart serves.
func (d *Daemon) Create(ctx context.Context, req control.CreateRequest) (control.SnapshotInfo, error) {
	if err := d.ready(); err != nil {
		return control.SnapshotInfo{}, err
	}
	if req.TimeoutMillis < 0 {
		return control.SnapshotInfo{}, fmt.Errorf("%w: timeout %d ms is negative", control.ErrInvalid, req.TimeoutMillis)
	}
	if req.TimeoutMillis > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutMillis)*time.Millisecond)
		defer cancel()
	}
	if err := d.lockOps(ctx); err != nil {
		return control.SnapshotInfo{}, fmt.Errorf("create abandoned while another create or clear ran (%w): nothing was created", err)
	}
	defer d.unlockOps()
	if err := d.refuseDuringRollback("create", ""); err != nil {
		return control.SnapshotInfo{}, err
	}
	rec, err := d.checkCreate(req)
	if err != nil {
		d.log.Warn("create refused", "snapshot", req.Name, "err", err)
		return control.SnapshotInfo{}, err
	}
	if asked := cmp.Or(req.ClusterSize, cow.DefaultClusterSize); rec.ClusterSize != asked {
		d.log.Warn("cluster size raised: the origin is too large for the size asked (at most 16 Mi clusters)",
			"snapshot", rec.Name, "asked", asked, "cluster_size", rec.ClusterSize, "origin_size", d.engine.Size())
	}
	var undo []func()
	fail := func(err error) (control.SnapshotInfo, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		d.log.Warn("create failed", "snapshot", req.Name, "err", err)
		return control.SnapshotInfo{}, err
	}

	if err := d.state.put(rec); err != nil {
		return fail(err)
	}
	undo = append(undo, func() {
		if err := d.state.remove(rec.Name); err != nil {
			d.log.Error("undo create: remove state record", "snapshot", rec.Name, "err", err)
		}
	})
	d.crashpoint("create:record")
	store, err := createBacking(ctx, rec, req.Force)
	if err != nil {
		return fail(backingError(rec.BackingPath, err))
	}
	retire := func() {
		kept, err := retireBacking(rec, d.origin.OriginID)
		if err != nil {
			d.log.Error("undo create: remove the new store", "snapshot", rec.Name, "err", err)
		} else if kept != "" {
			d.log.Debug("undo create: nothing of ours at the backing path", "snapshot", rec.Name, "kept", kept)
		}
	}
	undo = append(undo, func() { store.Close(); retire() })
	d.crashpoint("create:store")
	snap, err := d.engine.Create(ctx, store, cow.SnapshotOptions{
		Name:        rec.Name,
		ClusterSize: rec.ClusterSize,
		Transient:   rec.Transient,
		MaxSize:     rec.MaxSize,
		CacheBytes:  d.cfg.CacheBytes,
		OriginID:    d.origin.OriginID,
		UUID:        rec.storeUUID(),
	})
	if err != nil {
		return fail(backingError(rec.BackingPath, err))
	}
	// Past the instant: the create completes whatever the client does
	// (nothing below takes ctx).
	//
	// From here the engine owns the store and closes it in Clear.
	undo[len(undo)-1] = func() {
		if err := d.engine.Clear(rec.Name); err != nil {
			d.log.Error("undo create: clear", "snapshot", rec.Name, "err", err)
		}
		retire()
	}
	d.crashpoint("create:instant")
	if err := placeBacking(rec); err != nil {
		return fail(err)
	}
	d.crashpoint("create:placed")
	// Record what the engine chose (the cluster size may have been raised
	// for a large origin) and the store's creation time, so that a snapshot
	// that is gone after a restart is still described right.
	i := snap.Info()
	rec.Phase, rec.ClusterSize, rec.Created = phaseReady, i.ClusterSize, i.Created.UTC()
	if err := d.state.put(rec); err != nil {
		return fail(err)
	}
	d.crashpoint("create:ready")
	if err := d.export(snap); err != nil {
		return fail(err)
	}
	e := &entry{rec: rec, snap: snap, served: true}
	info := d.info(e)
	d.mu.Lock()
	d.snaps[rec.Name] = e
	d.mu.Unlock()
	d.log.Info("snapshot ready", "snapshot", rec.Name, "backing", rec.BackingPath, "store", rec.UUID,
		"persistent", !rec.Transient, "cluster_size", info.ClusterSize)
	if d.ident.Weak() && !rec.Transient {
		d.log.Warn("the origin has no stable identifier (no serial, WWID or other kernel name): a restart cannot tell another device of the same size at its path from it",
			"snapshot", rec.Name, "origin_identity", d.ident.String())
	}
	return info, nil
}

// checkCreate validates a request before anything is touched and returns
// the record the create starts with.
func (d *Daemon) checkCreate(req control.CreateRequest) (snapRecord, error) {
	if err := ValidName(req.Name); err != nil {
		return snapRecord{}, fmt.Errorf("%w: snapshot %w", control.ErrInvalid, err)
	}
	if req.Name == d.cfg.Name {
		return snapRecord{}, fmt.Errorf("%w: %q is the origin export's name", control.ErrExists, req.Name)
	}
	d.mu.Lock()
	_, exists := d.snaps[req.Name]
	d.mu.Unlock()
	if exists {
		return snapRecord{}, fmt.Errorf("snapshot %q %w", req.Name, control.ErrExists)
	}
	if !filepath.IsAbs(req.BackingPath) {
		return snapRecord{}, fmt.Errorf("%w: backing path %q is not absolute", control.ErrInvalid, req.BackingPath)
	}
	if cs := req.ClusterSize; cs != 0 && (cs < cow.MinClusterSize || cs > cow.MaxClusterSize || cs&(cs-1) != 0) {
		return snapRecord{}, fmt.Errorf("%w: cluster size %d is not a power of two between %d and %d",
			control.ErrInvalid, cs, cow.MinClusterSize, cow.MaxClusterSize)
	}
	if req.MaxSize < 0 {
		return snapRecord{}, fmt.Errorf("%w: max size %d is negative", control.ErrInvalid, req.MaxSize)
	}
	size := d.engine.Size()
	if size > cow.MaxOriginSize {
		return snapRecord{}, refusal{control.ErrInvalid, fmt.Sprintf("origin %s is %d bytes, over 16 TiB (%d bytes): no snapshot can cover it (at most %d clusters of at most 1 MiB)",
			d.cfg.Origin, size, cow.MaxOriginSize, cow.MaxClusters)}
	}
	// The engine raises the cluster size for a large origin; choosing it
	// here lets Create say so before the snapshot is taken.
	cs, err := cow.ClusterSize(size, req.ClusterSize)
	if err != nil {
		return snapRecord{}, fmt.Errorf("%w: %w", control.ErrInvalid, err)
	}
	id := uuid.New()
	if req.UUID != "" {
		if id, err = uuid.Parse(req.UUID); err != nil || id == (uuid.UUID{}) {
			return snapRecord{}, fmt.Errorf("%w: store UUID %q", control.ErrInvalid, req.UUID)
		}
	}
	if err := d.checkBackingPath(req.BackingPath); err != nil {
		return snapRecord{}, err
	}
	rec := snapRecord{
		Name:        req.Name,
		Phase:       phaseCreating,
		UUID:        id.String(),
		BackingPath: filepath.Clean(req.BackingPath),
		ClusterSize: cs,
		Transient:   req.Transient,
		MaxSize:     req.MaxSize,
		Created:     time.Now().UTC(),
		Origin:      &d.ident,
		Session:     d.session,
	}
	fi, err := os.Stat(rec.BackingPath)
	switch {
	case err == nil && isBlockDevice(fi):
		rec.Device = true
	case err == nil && fi.Mode().IsRegular():
		return snapRecord{}, fmt.Errorf("backing file %s %w", req.BackingPath, control.ErrExists)
	case err == nil:
		// "already exists" would send the user to delete it: say what it
		// is instead.
		return snapRecord{}, refusal{control.ErrInvalid, fmt.Sprintf("backing path %s is %s, not a file or block device",
			req.BackingPath, fileKind(fi.Mode()))}
	case !errors.Is(err, os.ErrNotExist):
		return snapRecord{}, backingError(req.BackingPath, err)
	case isLink(rec.BackingPath):
		return snapRecord{}, fmt.Errorf("backing path %s is a symbolic link to nothing: %w", req.BackingPath, control.ErrExists)
	}
	return rec, nil
}

// fileKind names what a file that is neither a regular file nor a block
// device is, with its article.
func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m.IsDir():
		return "a directory"
	case m&os.ModeNamedPipe != 0:
		return "a named pipe"
	case m&os.ModeSocket != 0:
		return "a socket"
	}
	return "a special file"
}

func isLink(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.Mode()&os.ModeSymlink != 0
}

// checkBackingPath refuses a backing path inside the state directory,
// where it would be clobbered, or read as a record, by the daemon's own
// bookkeeping.
func (d *Daemon) checkBackingPath(path string) error {
	dir, err := filepath.EvalSymlinks(filepath.Dir(path))
	if err != nil {
		return backingError(path, err)
	}
	state, err := filepath.EvalSymlinks(d.cfg.StateDir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if rel, err := filepath.Rel(state, filepath.Join(dir, filepath.Base(path))); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return fmt.Errorf("%w: backing path %s is inside the daemon's state directory %s; put it elsewhere",
			control.ErrInvalid, path, d.cfg.StateDir)
	}
	return nil
}

// export serves a snapshot read-only under its own name.
func (d *Daemon) export(snap *cow.Snapshot) error {
	info := snap.Info()
	err := d.srv.AddExport(nbdsrv.Export{
		Name:        snap.Name(),
		Description: fmt.Sprintf("nbdsnap snapshot of %s taken %s", d.cfg.Name, info.Created.UTC().Format(time.RFC3339)),
		Size:        snap.Size(),
		Backend:     snapshotBackend{snap},
		ReadOnly:    true,
		MultiConn:   true,
		Allow:       allow(d.cfg.TLS.AllowSnapshots),
		MetaContexts: func() []nbdsrv.MetaContext {
			return dirtyContexts(snap.Bases(), snap.Changed)
		},
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
// has it open, unless force), its copy-on-write, its store and its record.
//
// The first durable step marks the record "clearing": from then on no
// restart serves the snapshot, and a restart finishes the clear. The store
// is then retired only if it proves to be the snapshot's (retireBacking): a
// file deleted, a device's header wiped; anything else at the backing path
// is kept, and the result says so.
func (d *Daemon) Clear(ctx context.Context, name string, force bool) (control.ClearResult, error) {
	if err := d.ready(); err != nil {
		return control.ClearResult{}, err
	}
	if err := d.lockOps(ctx); err != nil {
		return control.ClearResult{}, err
	}
	defer d.unlockOps()
	if err := d.refuseDuringRollback("cleared", name); err != nil {
		return control.ClearResult{}, err
	}
	return d.clear(name, force)
}

// clear is Clear with the ops lock held.
func (d *Daemon) clear(name string, force bool) (control.ClearResult, error) {
	d.mu.Lock()
	e, ok := d.snaps[name]
	d.mu.Unlock()
	if !ok {
		return control.ClearResult{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	}
	if e.served {
		err := d.srv.RemoveExport(name, force)
		if errors.Is(err, nbdsrv.ErrExportBusy) {
			return control.ClearResult{}, fmt.Errorf("snapshot %q is open by %d NBD client(s); disconnect them or use --force: %w",
				name, d.srv.OpenConns(name), control.ErrBusy)
		}
		if err != nil && !errors.Is(err, nbdsrv.ErrNoExport) {
			return control.ClearResult{}, fmt.Errorf("clear %q: remove export: %w", name, err)
		}
		d.mu.Lock()
		e.served = false
		d.mu.Unlock()
	}
	if e.damaged != nil {
		// Nothing says which store the record meant: only the record goes.
		if err := d.state.removeFile(e.file); err != nil {
			return control.ClearResult{}, fmt.Errorf("clear %q: %w", name, err)
		}
		d.forget(name)
		d.log.Info("damaged record cleared", "snapshot", name, "file", e.file)
		return control.ClearResult{Kept: "the record was damaged, so any backing store it named was left in place"}, nil
	}
	rec := e.rec
	rec.Phase = phaseClearing
	if err := d.state.put(rec); err != nil {
		return control.ClearResult{}, fmt.Errorf("clear %q: %w", name, err)
	}
	d.mu.Lock()
	e.rec.Phase = phaseClearing
	d.mu.Unlock()
	d.crashpoint("clear:marked")
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
	d.crashpoint("clear:stopped")
	kept, err := retireBacking(rec, d.origin.OriginID)
	if err != nil {
		d.mu.Lock()
		e.gone = "clear did not finish: " + err.Error()
		d.mu.Unlock()
		return control.ClearResult{}, fmt.Errorf("clear %q: %w (run clear again; a restart finishes it too)", name, err)
	}
	d.crashpoint("clear:retired")
	if err := d.state.remove(name); err != nil {
		return control.ClearResult{}, fmt.Errorf("clear %q: %w", name, err)
	}
	d.forget(name)
	if kept != "" {
		d.log.Warn("snapshot cleared; its backing path holds something else, left in place", "snapshot", name, "kept", kept)
	} else {
		d.log.Info("snapshot cleared", "snapshot", name, "forced", force)
	}
	return control.ClearResult{Kept: kept}, nil
}

// Bookmark turns a snapshot into a bookmark (clear --bookmark): its export
// goes (refused with ErrBusy while a client has it open, unless force) and
// its store drops the image, but it keeps recording which blocks the origin
// writes, so that snapshots created later can report the changes since it.
//
// The store's header is the point of no return (cow.Engine.Bookmark); the
// record says "bookmark" after it. A crash between the two leaves a ready
// record whose store is a bookmark, which a restart completes (settle), as
// the image is gone either way.
func (d *Daemon) Bookmark(ctx context.Context, name string, force bool) (control.SnapshotInfo, error) {
	if err := d.ready(); err != nil {
		return control.SnapshotInfo{}, err
	}
	if err := d.lockOps(ctx); err != nil {
		return control.SnapshotInfo{}, err
	}
	defer d.unlockOps()
	if err := d.refuseDuringRollback("turned into a bookmark", name); err != nil {
		return control.SnapshotInfo{}, err
	}
	d.mu.Lock()
	e, ok := d.snaps[name]
	d.mu.Unlock()
	switch {
	case !ok:
		return control.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	case e.rec.Bookmark:
		return control.SnapshotInfo{}, fmt.Errorf("%w: %q is a bookmark already", control.ErrInvalid, name)
	case e.snap == nil || !e.snap.Info().Valid:
		return control.SnapshotInfo{}, fmt.Errorf("%w: %q is invalid: only a valid snapshot can become a bookmark (clear it instead)", control.ErrInvalid, name)
	case e.rec.Transient:
		return control.SnapshotInfo{}, fmt.Errorf("%w: %q is transient: it is not kept across a restart, so it cannot become a bookmark", control.ErrInvalid, name)
	}
	if e.served {
		err := d.srv.RemoveExport(name, force)
		if errors.Is(err, nbdsrv.ErrExportBusy) {
			return control.SnapshotInfo{}, fmt.Errorf("snapshot %q is open by %d NBD client(s); disconnect them or use --force: %w",
				name, d.srv.OpenConns(name), control.ErrBusy)
		}
		if err != nil && !errors.Is(err, nbdsrv.ErrNoExport) {
			return control.SnapshotInfo{}, fmt.Errorf("bookmark %q: remove export: %w", name, err)
		}
		d.mu.Lock()
		e.served = false
		d.mu.Unlock()
	}
	if err := d.engine.Bookmark(name); err != nil {
		// Still the snapshot it was: serve it again.
		if xerr := d.export(e.snap); xerr == nil {
			d.mu.Lock()
			e.served = true
			d.mu.Unlock()
		}
		if errors.Is(err, cow.ErrInvalid) || errors.Is(err, cow.ErrBadOption) {
			return control.SnapshotInfo{}, fmt.Errorf("%w: %v", control.ErrInvalid, err)
		}
		return control.SnapshotInfo{}, fmt.Errorf("bookmark %q: %w", name, err)
	}
	d.crashpoint("bookmark:store")
	rec := e.rec
	rec.Bookmark = true
	if err := d.state.put(rec); err != nil {
		return control.SnapshotInfo{}, fmt.Errorf("bookmark %q: the store is a bookmark, but its record could not say so (a restart completes it): %w", name, err)
	}
	d.mu.Lock()
	e.rec.Bookmark = true
	c := *e
	d.mu.Unlock()
	d.log.Info("snapshot turned into a bookmark", "snapshot", name, "forced", force)
	return d.info(&c), nil
}

// forget drops a cleared snapshot from the table, the space watch and the
// metrics.
func (d *Daemon) forget(name string) {
	d.mu.Lock()
	delete(d.snaps, name)
	delete(d.spaces, name)
	d.mu.Unlock()
	d.metrics.forget(name)
}

// recordInvalid is the engine's RecordInvalid: it marks the snapshot's
// record invalid, so that a restart does not serve the snapshot although
// its store's header may say valid (writing the header may have failed).
// It runs on the snapshot's writer, which Create and Clear may be waiting
// for with the ops lock held: it takes only the state directory's lock.
func (d *Daemon) recordInvalid(name, reason string) error {
	if err := d.state.markInvalid(name, reason); err != nil {
		return fmt.Errorf("record invalid snapshot %q: %w", name, err)
	}
	return nil
}

// Status describes the daemon and every snapshot, oldest first.
func (d *Daemon) Status(ctx context.Context) (control.Status, error) {
	if err := d.ready(); err != nil {
		return control.Status{}, err
	}
	st := control.Status{
		Name:           d.cfg.Name,
		Origin:         d.cfg.Origin,
		OriginSize:     d.engine.Size(),
		Version:        d.cfg.Version,
		PID:            os.Getpid(),
		Listen:         d.addrs,
		StateDir:       d.cfg.StateDir,
		OriginIdentity: d.ident.String(),
		Started:        d.started,
		Conns:          d.srv.OpenConns(d.cfg.Name),
		Snapshots:      []control.SnapshotInfo{},
	}
	if rb, ok := d.rollbackStatus(); ok {
		st.Rollback = &rb
	}
	h := d.engine.Held()
	st.HeldWrites = control.HeldWrites{BudgetBytes: h.Budget, Bytes: h.Bytes, Writes: h.Writes, Total: h.Total, Failed: h.Failed}
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

// Snapshot describes one snapshot; with settled, once no create or clear
// is under way (a client that lost the answer to its create asks that way,
// so that the answer is final).
func (d *Daemon) Snapshot(ctx context.Context, name string, settled bool) (control.SnapshotInfo, error) {
	if err := d.ready(); err != nil {
		return control.SnapshotInfo{}, err
	}
	if settled {
		if err := d.lockOps(ctx); err != nil {
			return control.SnapshotInfo{}, err
		}
		d.unlockOps()
	}
	c, ok := d.entry(name)
	if !ok {
		return control.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
	}
	return d.info(&c), nil
}

// entry returns a copy of snapshot name's entry, taken under mu.
func (d *Daemon) entry(name string) (entry, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.snaps[name]
	if !ok {
		return entry{}, false
	}
	return *e, true
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
		StoreFree:   -1,
		FSFree:      -1,
		Bookmark:    e.rec.Bookmark,
		Granularity: e.rec.ClusterSize,
		DiffBases:   []string{},
		Generation:  e.rec.UUID,
	}
	if e.served {
		out.Conns = d.srv.OpenConns(e.rec.Name)
	}
	snap := e.snap
	if snap == nil {
		out.State = control.StateInvalid
		out.Reason = e.gone
		out.UUID = e.rec.UUID
		if e.rec.BackingPath != "" && !e.rec.Device {
			if fi, err := os.Stat(e.rec.BackingPath); err == nil {
				out.BackingBytes = fi.Size()
			}
		}
		return out
	}
	i := snap.Info()
	out.UUID = i.UUID
	out.Generation = i.UUID
	out.Granularity = i.ClusterSize
	out.Bookmark = i.Bookmark
	out.DiffBases = diffBases(snap)
	out.Created = i.Created
	out.Persistent = i.Persistent
	out.ClusterSize = i.ClusterSize
	out.ClustersTotal = i.ClustersTotal
	out.ClustersCopied = i.ClustersCopied
	out.BackingBytes = i.StoreBytes
	out.CacheBytes = int64(i.CacheSlots) * int64(i.ClusterSize)
	out.CreatePauseMicros = i.CreatePause.Microseconds()
	out.Size = snap.Size()
	out.State = control.StateValid
	if !i.Valid {
		out.State = control.StateInvalid
		out.Reason = i.Reason
	}
	sp := d.checkSpace(e.rec, snap, time.Now())
	out.StoreFree, out.FSFree = sp.free, sp.fsFree
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
// engine's Zero to nbdsrv's: a fast zero is done only while no snapshot
// needs the old clusters copied first (cow.Engine.ZeroFast), and refused
// with ErrNotFast otherwise, which tells the client (qemu-img convert,
// nbdcopy) to write its zeros itself.
type originBackend struct{ *cow.Engine }

func (b originBackend) Zero(ctx context.Context, off, length int64, flags nbdsrv.ZeroFlags) error {
	if flags.Fast {
		err := b.Engine.ZeroFast(ctx, off, length, flags.NoHole, flags.FUA)
		if errors.Is(err, cow.ErrNotFast) {
			return fmt.Errorf("%w: %w", nbdsrv.ErrNotFast, err)
		}
		return err
	}
	return b.Engine.Zero(ctx, off, length, flags.FUA)
}
