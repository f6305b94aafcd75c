package cow

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Rollback puts a snapshot's image back onto the origin, online.
//
// The rollback instant (Engine.Rollback, under the gate like a create
// instant): no origin write is in flight, so every cluster the source
// snapshot copied is committed; the clusters to restore are exactly those
// (todo), and the durable record of the rollback is a progress file naming
// the source store and its entry count (backstore's "Rollback progress").
// From then on the origin is the source's image plus the writes made after
// the instant:
//
//   - A read of a cluster still to restore reads the source's copy; any
//     other reads the origin.
//   - A write, trim or zero first restores every cluster of its range still
//     to restore, then goes on as usual. The copier goroutine restores the
//     rest in cluster order. A cluster is restored by one goroutine at a
//     time (busy); the restore is an origin write like any other and goes
//     through copy-on-write first, so the other snapshots stay exact.
//   - done(c) is set only after c's restored data reached the origin and
//     c was marked in the progress record (in memory: the next checkpoint
//     records it), and a write to c is issued only after done(c) is set:
//     so a read that finds done(c) set reads the origin, which holds the
//     restored data or newer; the copier, which restores only while
//     done(c) is clear and holds c busy, never writes over a newer write;
//     and the checkpoint of a FLUSH or FUA write after a write to c
//     records c, so a crash cannot restore c again over that write.
//
// Crash safety: a cluster is marked restored in the progress file only
// after the origin was synced following its restore (Progress.Sync), and
// every FLUSH and FUA write makes the marks durable before it returns. After
// a crash, a cluster not marked is restored again; any write on top of it
// was never flushed, so losing it is what a disk's volatile cache may do,
// and the cluster then holds the source's data, which is what it held at
// the last completed FLUSH. No cluster marked restored can hold
// pre-rollback data. Snapshots created during a rollback would freeze the
// origin export's content, not what is physically on the origin, so Create
// is refused until the rollback ended; the source cannot be cleared or
// bookmarked meanwhile.

// RollbackOptions configure a rollback.
type RollbackOptions struct {
	// Consume is recorded for the owner, who clears the snapshot when the
	// rollback is complete.
	Consume bool
	// Rate bounds the copier, in bytes per second (0: no bound). Writes
	// to clusters not yet restored restore them at once regardless.
	Rate int64
}

// Rollback states.
const (
	RollbackRunning  = "running"
	RollbackComplete = "complete"
	RollbackFailed   = "failed"
)

// RollbackInfo describes the rollback in progress.
type RollbackInfo struct {
	Snapshot string
	UUID     string
	Started  time.Time
	Consume  bool
	Rate     int64
	// State is RollbackRunning, RollbackComplete or RollbackFailed (the
	// copier stopped on errors: Err says which; the clusters it could
	// not restore read from the snapshot, and a restart tries again).
	State          string
	Err            string
	TotalBytes     int64 // bytes to restore at the instant
	RemainingBytes int64 // never increases
	// Unsynced is true while some restored clusters are not yet recorded
	// durably (the next FLUSH or checkpoint records them).
	Unsynced bool
}

type rollback struct {
	src  *Snapshot
	geo  geometry
	prog *backstore.Progress
	opts RollbackOptions

	todo bitmap // clusters to restore; fixed at the instant
	done bitmap // restored: set only after the origin write completed

	total     int64
	remaining atomic.Int64
	marked    atomic.Int64 // restored clusters, counted by restore
	durable   atomic.Int64 // restored clusters recorded durably

	// complete: every cluster is restored and recorded durably; reads and
	// writes no longer look at the rollback.
	complete atomic.Bool

	mu   sync.Mutex
	cond sync.Cond
	busy map[uint32]bool
	err  error // the copier's last failure

	ckptMu sync.Mutex // one checkpoint at a time; closed under it
	closed bool

	stop     chan struct{} // closed to stop the copier
	finished chan struct{} // closed when the copier returned
}

// pending reports whether cluster c still has to be restored.
func (rb *rollback) pending(c uint32) bool { return rb.todo.get(c) && !rb.done.get(c) }

// active returns the rollback whose reads and writes need care, if any.
func (e *Engine) active() *rollback {
	if rb := e.rb.Load(); rb != nil && !rb.complete.Load() {
		return rb
	}
	return nil
}

// Rollback starts rolling the origin back to snapshot name's image; see
// the comment at the top of rollback.go. progress is an empty regular file
// for the progress record; on success the engine owns it, on error the
// caller keeps it (it may hold a header that was never committed: remove
// it). ctx bounds the wait for origin writes in flight; once the progress
// header is durable (the rollback instant) Rollback succeeds.
func (e *Engine) Rollback(ctx context.Context, name string, progress vfs.File, opts RollbackOptions) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if opts.Rate < 0 {
		return fmt.Errorf("cow: rollback: negative rate: %w", ErrBadOption)
	}
	s, ok := e.Snapshot(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if !s.persistent {
		return fmt.Errorf("cow: rollback to %q: a transient snapshot cannot be rolled back to (its copies would not survive a crash in the middle): %w", name, ErrBadOption)
	}
	if err := e.lockGateCtx(ctx); err != nil {
		return fmt.Errorf("cow: rollback to %q: waiting for origin writes in flight: %w", name, err)
	}
	defer e.gate.Unlock()
	if e.closed {
		return ErrClosed
	}
	if rb := e.rb.Load(); rb != nil {
		return fmt.Errorf("%w: to %q", ErrRollback, rb.src.name)
	}
	if cur, ok := e.Snapshot(name); !ok || cur != s {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	pending := s.commits.holdStore()
	s.commits.releaseStore()
	var refuse error
	switch {
	case s.inv.invalid.Load():
		refuse = &invalidError{reason: s.inv.why()}
	case s.bookmark.Load():
		refuse = ErrBookmark
	case pending > 0:
		// Every origin write waits for its clusters' commit, and none is
		// in flight.
		refuse = fmt.Errorf("%d clusters not committed with no origin write in flight", pending)
	}
	if refuse != nil {
		return fmt.Errorf("cow: rollback to %q: %w", name, refuse)
	}
	id, err := uuid.Parse(s.hdr.UUID)
	if err != nil {
		return fmt.Errorf("cow: rollback to %q: store UUID %q: %w", name, s.hdr.UUID, err)
	}
	info := backstore.ProgressInfo{
		UUID:        id,
		ClusterSize: s.geo.csize,
		OriginSize:  e.size,
		Entries:     s.st.count(),
		Started:     time.Now(),
		Consume:     opts.Consume,
		Rate:        opts.Rate,
	}
	// The last moment to give up: nothing is recorded yet.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("cow: rollback to %q abandoned before the rollback instant: %w", name, err)
	}
	prog, err := backstore.CreateProgress(progress, info)
	if err != nil {
		return fmt.Errorf("cow: rollback to %q: %w", name, err)
	}
	rb, err := e.newRollback(s, prog)
	if err != nil {
		// Committed, but this store cannot be what it says: only a store
		// changing under us gets here.
		return fmt.Errorf("cow: rollback to %q: %w", name, err)
	}
	e.installRollback(rb)
	e.log.Info("rollback started", "snapshot", name, "bytes", rb.total, "rate", opts.Rate, "consume", opts.Consume)
	return nil
}

// ResumeRollback continues a rollback a restart interrupted, from its
// progress file. Its source snapshot must have been reopened (Reopen; it
// may be invalid: its store still holds the clusters to restore, and their
// checksums are checked on every read). It must run before the origin
// takes a request. On success the engine owns prog.
func (e *Engine) ResumeRollback(prog *backstore.Progress) error {
	info := prog.Info()
	e.lockGate()
	defer e.gate.Unlock()
	if e.closed {
		return ErrClosed
	}
	if rb := e.rb.Load(); rb != nil {
		return fmt.Errorf("%w: to %q", ErrRollback, rb.src.name)
	}
	var src *Snapshot
	for _, s := range e.Snapshots() {
		if s.hdr.UUID == info.UUID.String() {
			src = s
		}
	}
	switch {
	case src == nil:
		return fmt.Errorf("%w: the rollback's snapshot (store %s) is not open", ErrNotFound, info.UUID)
	case !src.persistent || src.bookmark.Load():
		return fmt.Errorf("cow: resume rollback to %q: the store is no longer a snapshot with an image: %w", src.name, ErrBadOption)
	case src.geo.csize != info.ClusterSize || e.size != info.OriginSize:
		return fmt.Errorf("cow: resume rollback to %q: progress is of cluster size %d on %d bytes, the snapshot %d on %d: %w",
			src.name, info.ClusterSize, info.OriginSize, src.geo.csize, e.size, backstore.ErrCorrupt)
	}
	rb, err := e.newRollback(src, prog)
	if err != nil {
		return fmt.Errorf("cow: resume rollback to %q: %w", src.name, err)
	}
	e.installRollback(rb)
	e.log.Info("rollback resumed", "snapshot", src.name, "bytes", rb.total, "remaining", rb.remaining.Load())
	return nil
}

// newRollback builds the rollback's bitmaps from the source store and the
// progress record. The clusters to restore are those whose entry number is
// below the record's entry count; every mark must be one of them.
func (e *Engine) newRollback(src *Snapshot, prog *backstore.Progress) (*rollback, error) {
	info := prog.Info()
	if n := src.st.count(); n < info.Entries {
		return nil, fmt.Errorf("the store holds %d entries, the rollback began with %d: %w", n, info.Entries, backstore.ErrCorrupt)
	}
	rb := &rollback{
		src:      src,
		geo:      src.geo,
		prog:     prog,
		opts:     RollbackOptions{Consume: info.Consume, Rate: info.Rate},
		todo:     newBitmap(src.geo.count),
		done:     newBitmap(src.geo.count),
		busy:     make(map[uint32]bool),
		stop:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	rb.cond.L = &rb.mu
	var todo, done int64
	var remaining int64
	src.st.forEachCopied(func(c uint32) {
		if n, ok := src.st.entry(c); !ok || n >= info.Entries || c >= src.geo.count {
			return
		}
		rb.todo.set(c)
		todo++
		rb.total += int64(src.geo.clusterLen(c))
		if prog.Restored(c) {
			rb.done.set(c)
			done++
		} else {
			remaining += int64(src.geo.clusterLen(c))
		}
	})
	if todo != int64(info.Entries) || done != int64(prog.Done()) {
		return nil, fmt.Errorf("the store holds %d of the rollback's %d clusters, and %d of its %d restored marks: %w",
			todo, info.Entries, done, prog.Done(), backstore.ErrCorrupt)
	}
	rb.remaining.Store(remaining)
	rb.marked.Store(done)
	rb.durable.Store(done)
	return rb, nil
}

// installRollback makes rb the engine's rollback and starts its copier.
// The caller holds the gate exclusively.
func (e *Engine) installRollback(rb *rollback) {
	e.rb.Store(rb)
	go e.copyBack(rb)
}

// RollbackInfo describes the rollback, if one is under way or complete but
// not yet ended (EndRollback).
func (e *Engine) RollbackInfo() (RollbackInfo, bool) {
	rb := e.rb.Load()
	if rb == nil {
		return RollbackInfo{}, false
	}
	info := rb.prog.Info()
	ri := RollbackInfo{
		Snapshot:       rb.src.name,
		UUID:           rb.src.hdr.UUID,
		Started:        info.Started,
		Consume:        info.Consume,
		Rate:           info.Rate,
		State:          RollbackRunning,
		TotalBytes:     rb.total,
		RemainingBytes: rb.remaining.Load(),
		Unsynced:       rb.durable.Load() < rb.marked.Load(),
	}
	rb.mu.Lock()
	if rb.err != nil {
		ri.Err = rb.err.Error()
	}
	rb.mu.Unlock()
	select {
	case <-rb.finished:
		if rb.complete.Load() {
			ri.State = RollbackComplete
		} else if ri.Err != "" {
			ri.State = RollbackFailed
		}
	default:
	}
	return ri, true
}

// RollbackDone returns a channel closed when the rollback's copier stopped:
// complete, failed, or stopped by Close. nil when there is no rollback.
func (e *Engine) RollbackDone() <-chan struct{} {
	if rb := e.rb.Load(); rb != nil {
		return rb.finished
	}
	return nil
}

// EndRollback forgets a complete rollback and closes its progress file,
// which the owner may then remove: from then on snapshots can be created
// and the source cleared again.
func (e *Engine) EndRollback() error {
	e.lockGate()
	defer e.gate.Unlock()
	rb := e.rb.Load()
	if rb == nil {
		return nil
	}
	if !rb.complete.Load() {
		return fmt.Errorf("%w: to %q, not complete", ErrRollback, rb.src.name)
	}
	e.rb.Store(nil)
	return rb.close()
}

// close ends the rollback's use of its progress file.
func (rb *rollback) close() error {
	rb.ckptMu.Lock()
	defer rb.ckptMu.Unlock()
	if rb.closed {
		return nil
	}
	rb.closed = true
	if err := rb.prog.Close(); err != nil {
		return fmt.Errorf("cow: rollback: close progress: %w", err)
	}
	return nil
}

// checkpoint records durably every cluster restored before it was called:
// it syncs the origin, then the progress marks (Progress.Sync).
func (rb *rollback) checkpoint(e *Engine) error {
	rb.ckptMu.Lock()
	defer rb.ckptMu.Unlock()
	if rb.closed {
		if !rb.complete.Load() {
			return ErrClosed // the engine closed
		}
		// Ended (EndRollback) after this caller found it: every mark is
		// durable, and the origin is all there is to sync.
		if err := e.origin.Sync(); err != nil {
			return fmt.Errorf("cow: sync origin: %w", err)
		}
		return nil
	}
	marked := rb.marked.Load()
	err := rb.prog.Sync(func() error {
		if err := e.origin.Sync(); err != nil {
			return fmt.Errorf("cow: sync origin: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("cow: rollback: %w", err)
	}
	rb.durable.Store(max(rb.durable.Load(), marked))
	return nil
}

// read reads [off, off+len(p)) of the origin as the rollback shows it.
func (rb *rollback) read(e *Engine, p []byte, off int64) error {
	if len(p) == 0 {
		return nil // span needs at least one byte
	}
	end := off + int64(len(p))
	first, last := rb.geo.span(off, int64(len(p)))
	run := int64(-1) // start of a run of clusters read from the origin
	readRun := func(to int64) error {
		if run < 0 {
			return nil
		}
		from := run
		run = -1
		if err := readFull(e.origin, p[from-off:to-off], from); err != nil {
			return fmt.Errorf("cow: read origin at %d: %w", from, err)
		}
		return nil
	}
	for c := first; ; c++ {
		lo := max(off, rb.geo.off(c))
		if rb.pending(c) {
			if err := readRun(lo); err != nil {
				return err
			}
			if err := rb.readSource(c, p, off, end); err != nil {
				return err
			}
		} else if run < 0 {
			run = lo
		}
		if c == last {
			return readRun(end)
		}
	}
}

// readSource reads the bytes of cluster c within [off, end) from the
// source's store into p (which holds [off, end)).
func (rb *rollback) readSource(c uint32, p []byte, off, end int64) error {
	s := rb.src
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed.Load() {
		return ErrClosed
	}
	if err := s.overlay(c, p, off, end); err != nil {
		return fmt.Errorf("cow: rollback to %q: cluster %d: %w: %w", s.name, c, err, syscall.EIO)
	}
	return nil
}

// restoreRange restores every cluster of [off, off+n) still to restore. The
// caller holds the gate shared.
func (rb *rollback) restoreRange(e *Engine, off, n int64) error {
	first, last := rb.geo.span(off, n)
	for c := first; ; c++ {
		if err := rb.restore(e, c); err != nil {
			return err
		}
		if c == last {
			return nil
		}
	}
}

// restore writes cluster c of the source back onto the origin unless that
// was done; concurrent callers for c wait for the one doing it. The caller
// holds the gate shared.
func (rb *rollback) restore(e *Engine, c uint32) error {
	if !rb.pending(c) {
		return nil
	}
	rb.mu.Lock()
	for rb.busy[c] {
		rb.cond.Wait()
	}
	if !rb.pending(c) {
		rb.mu.Unlock()
		return nil
	}
	rb.busy[c] = true
	rb.mu.Unlock()

	err := rb.writeBack(e, c)
	if err == nil {
		n := int64(rb.geo.clusterLen(c))
		// After the origin write completed: see the comment at the top.
		// Marked before done(c) is set: a write that finds done(c) set
		// goes on at once (FUA, or followed by a FLUSH), and the
		// checkpoint that makes it durable must record c, or a crash
		// would restore c again over it.
		rb.prog.Mark(c)
		rb.marked.Add(1)
		rb.remaining.Add(-n)
		rb.done.set(c)
	}
	rb.mu.Lock()
	delete(rb.busy, c)
	rb.cond.Broadcast()
	rb.mu.Unlock()
	return err
}

// writeBack copies cluster c from the source's store to the origin, after
// copy-on-write for the other snapshots.
func (rb *rollback) writeBack(e *Engine, c uint32) error {
	n := rb.geo.clusterLen(c)
	off := rb.geo.off(c)
	buf := rb.src.pool.get(1)
	defer buf.release()
	data := buf.data[:n]
	if err := rb.readSource(c, data, off, off+int64(n)); err != nil {
		return err
	}
	r := e.reqs.Get().(*cowReq)
	e.copyOnWrite(r, e.set, off, int64(n))
	r.wait()
	r.reset()
	e.reqs.Put(r)
	if _, err := e.origin.WriteAt(data, off); err != nil {
		return fmt.Errorf("cow: rollback to %q: write origin at %d: %w", rb.src.name, off, err)
	}
	return nil
}

// Copier tuning: how much it restores between checkpoints, at most.
const (
	checkpointEvery = time.Second
	checkpointBytes = 64 << 20
)

// copyBack is the copier goroutine: it restores every cluster still to
// restore, in cluster order, holding the gate shared for each, records
// progress every checkpointEvery or checkpointBytes, and at the end
// completes the rollback (a last checkpoint) or reports why it could not.
func (e *Engine) copyBack(rb *rollback) {
	defer close(rb.finished)
	var failed int
	var lastErr error
	start, last := time.Now(), time.Now()
	var since, sent int64
	for c := uint32(0); c < rb.geo.count; c++ {
		if !rb.pending(c) {
			continue
		}
		select {
		case <-rb.stop:
			return
		default:
		}
		e.gate.RLock()
		if e.closed {
			e.gate.RUnlock()
			return
		}
		err := rb.restore(e, c)
		n := int64(rb.geo.clusterLen(c))
		since += n
		sent += n
		var ckptErr error
		if since >= checkpointBytes || time.Since(last) >= checkpointEvery {
			// A failure leaves the marks to the next checkpoint.
			ckptErr = rb.checkpoint(e)
			since, last = 0, time.Now()
		}
		e.gate.RUnlock()
		if err != nil {
			failed++
			lastErr = err
			e.log.Error("rollback: cannot restore a cluster; it is tried again at the next start", "snapshot", rb.src.name, "cluster", c, "err", err)
		}
		if ckptErr != nil {
			e.log.Warn("rollback: cannot record progress; trying again later", "snapshot", rb.src.name, "err", ckptErr)
		}
		if rb.opts.Rate > 0 {
			if !rb.pace(start, sent) {
				return
			}
		}
	}
	e.gate.RLock()
	if e.closed {
		e.gate.RUnlock()
		return
	}
	var err error
	if failed == 0 {
		err = rb.checkpoint(e)
	}
	e.gate.RUnlock()
	switch {
	case failed > 0:
		rb.setErr(fmt.Errorf("%d clusters could not be restored; they read from the snapshot until a restart restores them (last error: %w)", failed, lastErr))
	case err != nil:
		rb.setErr(err)
	default:
		rb.complete.Store(true)
		e.log.Info("rollback complete", "snapshot", rb.src.name, "bytes", rb.total, "took", time.Since(rb.prog.Info().Started))
	}
}

func (rb *rollback) setErr(err error) {
	rb.mu.Lock()
	rb.err = err
	rb.mu.Unlock()
}

// pace sleeps until sent bytes since start fit the rate; false if the
// copier was stopped meanwhile.
func (rb *rollback) pace(start time.Time, sent int64) bool {
	due := start.Add(time.Duration(float64(sent) / float64(rb.opts.Rate) * float64(time.Second)))
	d := time.Until(due)
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-rb.stop:
		return false
	}
}

// stopRollback stops the copier and records what it restored; the caller
// holds the gate exclusively (Close), so no request is restoring. The
// progress file is closed: the next start resumes.
func (e *Engine) stopRollback() error {
	rb := e.rb.Load()
	if rb == nil {
		return nil
	}
	close(rb.stop)
	var errs []error
	if !rb.complete.Load() {
		if err := rb.checkpoint(e); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, rb.close())
	return errors.Join(errs...)
}

// pendingIn reports whether a cluster of [off, off+n) is still to restore.
func (rb *rollback) pendingIn(off, n int64) bool {
	first, last := rb.geo.span(off, n)
	for c := first; ; c++ {
		if rb.pending(c) {
			return true
		}
		if c == last {
			return false
		}
	}
}
