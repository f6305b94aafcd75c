package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// EngineOptions configure an Engine.
type EngineOptions struct {
	// Logger receives invalidations and create timings; nil discards.
	Logger *slog.Logger
	// RecordInvalid, if set, is how the engine tells its owner that a
	// persistent snapshot turned invalid: the snapshot's writer calls it
	// with the snapshot's name and the reason, in addition to recording
	// the reason in the store's header, before origin writes go on without
	// copying for that snapshot (see Snapshot.recordInvalid). It should
	// record the invalidation durably wherever the owner looks before
	// reopening the snapshot, so that a store whose header write failed is
	// not reopened as valid. It runs on the writer goroutine: it must not
	// call Clear or Close (they wait for that goroutine), and every origin
	// write that needs the snapshot waits for it to return. Abandon calls it
	// too, on its own goroutine, possibly while the writer calls it for the
	// same snapshot: it must be safe for concurrent use, and recording an
	// invalidation twice must be harmless. nil: the store header is the only
	// record, and Abandon cannot release a snapshot whose store is behind.
	RecordInvalid func(name, reason string) error
}

// SnapshotOptions configure a new snapshot.
type SnapshotOptions struct {
	Name string
	// ClusterSize is a power of two in [MinClusterSize, MaxClusterSize];
	// 0 means DefaultClusterSize. It is raised for very large origins.
	ClusterSize int
	// Transient snapshots are exactly fss: an origin write waits only for
	// the copy into the cache, the store is never synced and cannot be
	// reopened.
	Transient bool
	// MaxSize bounds the store (0 = no bound but the device's).
	MaxSize int64
	// CacheBytes is the cache budget (0 = DefaultCacheBytes); the cache
	// never has fewer slots than fss had.
	CacheBytes int64
	// OriginID identifies the origin; Reopen refuses a store whose
	// OriginID differs.
	OriginID string
	// UUID names the new store; zero means a random one. An owner that
	// records the store before creating it chooses it, so that it can
	// tell its store from any other file found at the same path later.
	UUID uuid.UUID
}

// ReopenOptions configure a reopened snapshot.
type ReopenOptions struct {
	// OriginID must equal the OriginID the store was created with.
	OriginID string
	// CacheBytes is the cache budget (0 = DefaultCacheBytes), as in
	// SnapshotOptions.
	CacheBytes int64
}

// DefaultCacheBytes is the default cache budget per snapshot.
const DefaultCacheBytes = 32 << 20

// cacheBudget is a cache budget option: 0 means DefaultCacheBytes.
func cacheBudget(option int64) int64 {
	if option == 0 {
		return DefaultCacheBytes
	}
	return option
}

// Engine is the copy-on-write proxy in front of one origin, with its
// snapshots. See the package documentation for its concurrency rules.
type Engine struct {
	origin vfs.File
	size   int64
	log    *slog.Logger
	zeros  []byte // read-only; the source of fallback zero writes
	// recordInvalid is EngineOptions.RecordInvalid.
	recordInvalid func(name, reason string) error

	// Store constructors; tests may replace them before the first Create.
	newStore  func(f vfs.File, o storeOptions) (clusterStore, error)
	openStore func(f vfs.File, origin io.ReaderAt, log *slog.Logger) (clusterStore, error)

	// gate is the create instant's barrier (fss: vfs_write_suspend).
	// Origin-modifying requests hold it shared from before their
	// copy-on-write until their origin operation completed; Create,
	// Reopen, Clear and Close hold it exclusively, so they see no request
	// in flight and no request sees the snapshot set change under it.
	gate sync.RWMutex
	// set and closed are written only with gate held exclusively and
	// read by requests holding it shared.
	set    *snapSet
	closed bool
	// rb is the rollback under way, or complete and not yet ended
	// (rollback.go); stored with gate held exclusively.
	rb atomic.Pointer[rollback]

	mu     sync.Mutex // guards byName, pools, nextID
	byName map[string]*Snapshot
	pools  map[int]*bufPool
	nextID uint64

	reqs sync.Pool // *cowReq: per-request scratch, so the hot path does not allocate

	// clock drives the snapshots' commit policy; tests may replace it
	// before the first Create or Reopen.
	clock clock

	held heldWrites
}

// NewEngine wraps origin. The engine does not close origin; it owns every
// store handed to a successful Create or Reopen.
func NewEngine(origin vfs.File, opts EngineOptions) (*Engine, error) {
	size, err := origin.Size()
	if err != nil {
		return nil, fmt.Errorf("cow: origin size: %w", err)
	}
	if size <= 0 {
		return nil, fmt.Errorf("cow: origin is empty: %w", ErrBadOption)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{
		origin:        origin,
		size:          size,
		log:           log,
		zeros:         make([]byte, 256<<10),
		recordInvalid: opts.RecordInvalid,
		newStore:      createBackstore,
		openStore:     openBackstore,
		set:           &snapSet{},
		byName:        make(map[string]*Snapshot),
		pools:         make(map[int]*bufPool),
		clock:         realClock{},
	}
	e.reqs.New = func() any { return new(cowReq) }
	e.held.init()
	return e, nil
}

// Size is the origin size in bytes.
func (e *Engine) Size() int64 { return e.size }

func (e *Engine) checkRange(off, n int64) error { return checkRange(e.size, off, n) }

// checkRange refuses [off, off+n) unless it lies within a device of size
// bytes.
func checkRange(size, off, n int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d, size %d", ErrRange, off, n, size)
	}
	return nil
}

// ReadAt reads the origin.
func (e *Engine) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := e.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	if rb := e.active(); rb != nil {
		return rb.read(e, p, off)
	}
	// Every write answered before this read began is registered: wait for
	// those it overlaps to reach the origin.
	e.held.waitOverlaps(off, int64(len(p)))
	if err := readFull(e.origin, p, off); err != nil {
		return fmt.Errorf("cow: read origin at %d: %w", off, err)
	}
	return nil
}

// WriteAt writes the origin after copying what the snapshots need.
// A plain write whose clusters wait for a commit is answered before it,
// and its origin write held until it (held.go).
func (e *Engine) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	r, err := e.admit(ctx, off, int64(len(p)))
	if err != nil {
		return err
	}
	if r != nil && !fua && e.hold(r, p, off) {
		e.putReq(r)
		return nil
	}
	defer e.gate.RUnlock()
	e.settle(r, off, int64(len(p)))
	if _, err := e.origin.WriteAt(p, off); err != nil {
		return fmt.Errorf("cow: write origin at %d: %w", off, err)
	}
	return e.fua(fua)
}

// Trim discards a range of the origin. The range reads back as zeros
// afterwards (the snapshots keep their old contents).
func (e *Engine) Trim(ctx context.Context, off, length int64, fua bool) error {
	r, err := e.admit(ctx, off, length)
	if err != nil {
		return err
	}
	defer e.gate.RUnlock()
	e.settle(r, off, length)
	if d, ok := e.origin.(vfs.Deallocator); ok && length > 0 {
		if err := d.Deallocate(off, length); err == nil {
			return e.fua(fua)
		}
		// Not supported here (or failed): writing zeros gives the same
		// contents, which is what the snapshot model relies on.
	}
	if err := e.writeZeros(off, length); err != nil {
		return err
	}
	return e.fua(fua)
}

// Zero writes zeros to a range of the origin, without transferring them
// when the origin can (vfs.Zeroer).
func (e *Engine) Zero(ctx context.Context, off, length int64, fua bool) error {
	r, err := e.admit(ctx, off, length)
	if err != nil {
		return err
	}
	defer e.gate.RUnlock()
	e.settle(r, off, length)
	if z, ok := e.origin.(vfs.Zeroer); ok && length > 0 {
		if err := z.ZeroRange(off, length); err == nil {
			return e.fua(fua)
		}
	}
	if err := e.writeZeros(off, length); err != nil {
		return err
	}
	return e.fua(fua)
}

// ZeroFast zeroes a range of the origin only if that is fast, as NBD's
// fast zero asks, and otherwise fails with ErrNotFast having changed
// nothing. It is fast only while no snapshot exists, which would need the
// old clusters copied first (reads and writes of the whole range), and on
// an origin that zeroes by changing extents (vfs.FastZeroer). It holds the
// gate like any origin write, so that no snapshot is created between the
// check and the zero.
func (e *Engine) ZeroFast(ctx context.Context, off, length int64, noHole, fua bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := e.checkRange(off, length); err != nil {
		return err
	}
	e.gate.RLock()
	defer e.gate.RUnlock()
	if e.closed {
		return ErrClosed
	}
	z, ok := e.origin.(vfs.FastZeroer)
	if !ok || len(e.set.groups) > 0 {
		return ErrNotFast
	}
	e.held.waitOverlaps(off, length)
	if length > 0 {
		if err := z.FastZeroRange(off, length, noHole); err != nil {
			if errors.Is(err, errors.ErrUnsupported) {
				return fmt.Errorf("%w: %w", ErrNotFast, err)
			}
			return fmt.Errorf("cow: zero origin at %d: %w", off, err)
		}
	}
	return e.fua(fua)
}

func (e *Engine) writeZeros(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(e.zeros)))
		if _, err := e.origin.WriteAt(e.zeros[:n], off); err != nil {
			return fmt.Errorf("cow: write zeros to origin at %d: %w", off, err)
		}
		off += n
		length -= n
	}
	return nil
}

func (e *Engine) fua(fua bool) error {
	if !fua {
		return nil
	}
	return e.syncOrigin()
}

// syncOrigin makes every completed origin write durable; during a rollback
// it records the restored clusters too (see rollback.go), or a crash would
// restore them again under a write that was made durable.
func (e *Engine) syncOrigin() error {
	if rb := e.active(); rb != nil {
		return rb.checkpoint(e)
	}
	if err := e.origin.Sync(); err != nil {
		return fmt.Errorf("cow: sync origin: %w", err)
	}
	return nil
}

// Flush makes every acknowledged origin write durable, then waits until
// every persistent snapshot has committed what it has copied so far.
// (Persistent commits end with a sync, so nothing more is needed for the
// stores; transient stores are never synced.)
func (e *Engine) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := e.held.drain(); err != nil {
		return err
	}
	if err := e.syncOrigin(); err != nil {
		return err
	}
	for _, s := range e.Snapshots() {
		if s.persistent {
			s.commits.waitDurable(s.commits.validSeq.Load())
		}
	}
	return nil
}

// admit lets an origin-modifying request in: on success the caller holds
// e.gate shared and every snapshot has what it needs of the range copied
// into its cache. The request's commit waits (persistent mode) are in r,
// nil when it has none; the caller waits for them with settle, or hands
// them to a held write (hold).
func (e *Engine) admit(ctx context.Context, off, n int64) (*cowReq, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := e.checkRange(off, n); err != nil {
		return nil, err
	}
	e.gate.RLock()
	if e.closed {
		e.gate.RUnlock()
		return nil, ErrClosed
	}
	if rb := e.active(); rb != nil && n > 0 {
		if err := rb.restoreRange(e, off, n); err != nil {
			e.gate.RUnlock()
			return nil, err
		}
	}
	if n == 0 || len(e.set.groups) == 0 {
		return nil, nil
	}
	r := e.reqs.Get().(*cowReq)
	e.copyOnWrite(r, e.set, off, n)
	if len(r.tickets) == 0 {
		e.putReq(r)
		return nil, nil
	}
	return r, nil
}

// settle waits, before an origin modification of [off, off+n) that is not
// held, for its commits (r, from admit) and for the held writes it
// overlaps, which were answered before it and must reach the origin first.
func (e *Engine) settle(r *cowReq, off, n int64) {
	if r != nil {
		r.wait()
		e.putReq(r)
	}
	e.held.waitOverlaps(off, n)
}

func (e *Engine) putReq(r *cowReq) {
	r.reset()
	e.reqs.Put(r)
}

// Create takes a snapshot of the origin into store.
//
// The create instant (fss_create_snapshot: vfs_write_suspend,
// vn_cow_establish, vfs_write_resume): stop admitting origin-modifying
// requests and wait for those in flight (e.gate), sync the origin so that
// the frozen image is durable (a write acknowledged before the instant but
// not yet flushed would otherwise be lost by a crash, and the recovered
// snapshot would differ from what the user froze), create and sync the store
// header, establish copy-on-write, resume. A crash before the header is
// durable leaves no snapshot; a crash after it leaves a snapshot whose
// origin has not been modified since the instant.
//
// ctx bounds everything before copy-on-write is established: if it ends
// while Create waits for requests in flight, syncs the origin or writes the
// store header, Create gives up and returns ctx's error, and no snapshot
// exists (the store may hold a header, which the caller discards). Once
// copy-on-write is established (the instant) Create succeeds whatever ctx
// does. So a caller whose client gave up before the instant never leaves a
// snapshot behind, and one that saw success knows the instant happened.
//
// On error the caller keeps store and closes it.
func (e *Engine) Create(ctx context.Context, store vfs.File, opts SnapshotOptions) (*Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if opts.Name == "" {
		return nil, fmt.Errorf("cow: snapshot needs a name: %w", ErrBadOption)
	}
	if opts.CacheBytes < 0 || opts.MaxSize < 0 {
		return nil, fmt.Errorf("cow: negative size option: %w", ErrBadOption)
	}
	geo, err := newGeometry(e.size, opts.ClusterSize)
	if err != nil {
		return nil, err
	}

	if err := e.lockGateCtx(ctx); err != nil {
		return nil, fmt.Errorf("cow: create %q: waiting for origin writes in flight: %w", opts.Name, err)
	}
	defer e.gate.Unlock()
	start := time.Now()
	if e.closed {
		return nil, ErrClosed
	}
	if rb := e.rb.Load(); rb != nil {
		// It would freeze what is physically on the origin, which is not
		// what the origin export shows until the rollback ends.
		return nil, fmt.Errorf("cow: create %q: %w to %q; create snapshots once it is complete", opts.Name, ErrRollback, rb.src.name)
	}
	e.mu.Lock()
	_, exists := e.byName[opts.Name]
	e.mu.Unlock()
	if exists {
		return nil, fmt.Errorf("%w: %q", ErrExists, opts.Name)
	}
	if err := e.origin.Sync(); err != nil {
		return nil, fmt.Errorf("cow: create %q: sync origin: %w", opts.Name, err)
	}
	var bases []storeBase
	if !opts.Transient {
		bases = e.basesNow()
	}
	st, err := e.newStore(store, storeOptions{
		Bases:       bases,
		Name:        opts.Name,
		ClusterSize: geo.csize,
		OriginSize:  e.size,
		OriginID:    opts.OriginID,
		Persistent:  !opts.Transient,
		MaxSize:     opts.MaxSize,
		Created:     time.Now(),
		UUID:        opts.UUID,
	})
	if err != nil {
		return nil, fmt.Errorf("cow: create %q: %w", opts.Name, err)
	}
	// The last moment to give up: nothing has been established yet.
	if err := ctx.Err(); err != nil {
		if rerr := st.release(); rerr != nil {
			e.log.Warn("close abandoned store", "snapshot", opts.Name, "err", rerr)
		}
		return nil, fmt.Errorf("cow: create %q abandoned before the create instant: %w", opts.Name, err)
	}
	s := e.newSnapshot(opts.Name, st, geo, !opts.Transient, cacheSlots(geo.csize, cacheBudget(opts.CacheBytes)))
	e.register(s)
	s.pause = time.Since(start)
	e.log.Info("snapshot created", "snapshot", s.name, "cluster_size", geo.csize,
		"clusters", geo.count, "cache_slots", s.cache.nslots, "persistent", s.persistent,
		"pause", s.pause)
	return s, nil
}

// Reopen resumes a persistent snapshot after a restart: it rebuilds the
// copied bitmap from the store and establishes copy-on-write again. The
// origin must not have been modified since the daemon stopped (nothing
// could have copied the old data). It refuses a transient store and a
// store of another origin (size or originID). On error the caller keeps
// store. store must not be the store of a live snapshot: opening a store
// writes to its header.
func (e *Engine) Reopen(ctx context.Context, store vfs.File, opts ReopenOptions) (*Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if opts.CacheBytes < 0 {
		return nil, fmt.Errorf("cow: negative cache size: %w", ErrBadOption)
	}
	st, err := e.openStore(store, e.origin, e.log)
	if err != nil {
		return nil, fmt.Errorf("cow: reopen: %w", err)
	}
	s, err := e.reopen(st, opts)
	if err != nil {
		if cerr := st.release(); cerr != nil {
			e.log.Warn("close refused store", "err", cerr)
		}
		return nil, err
	}
	return s, nil
}

func (e *Engine) reopen(st clusterStore, opts ReopenOptions) (*Snapshot, error) {
	originID := opts.OriginID
	h := st.header()
	if !h.Persistent {
		return nil, fmt.Errorf("cow: reopen %q: store is transient: %w", h.Name, ErrBadOption)
	}
	switch {
	case h.OriginID != originID:
		return nil, fmt.Errorf("%w: store %q is of origin %q (%d bytes), this is %q (%d bytes)",
			ErrOriginMismatch, h.Name, h.OriginID, h.OriginSize, originID, e.size)
	case h.OriginSize != e.size:
		// The same origin, resized: say so, rather than send the user
		// looking for another disk.
		return nil, fmt.Errorf("cow: reopen %q: the origin's size changed from %d to %d bytes since the snapshot was taken: %w",
			h.Name, h.OriginSize, e.size, ErrOriginResized)
	}
	cs := h.ClusterSize
	if cs < MinClusterSize || cs > maxRaisedClusterSize || cs&(cs-1) != 0 ||
		(e.size+int64(cs)-1)/int64(cs) > MaxClusters {
		return nil, fmt.Errorf("cow: reopen %q: cluster size %d in store: %w", h.Name, cs, ErrBadOption)
	}
	geo := geometryOf(e.size, cs)

	e.lockGate()
	defer e.gate.Unlock()
	if e.closed {
		return nil, ErrClosed
	}
	e.mu.Lock()
	_, exists := e.byName[h.Name]
	e.mu.Unlock()
	if exists {
		return nil, fmt.Errorf("%w: %q", ErrExists, h.Name)
	}
	s := e.newSnapshot(h.Name, st, geo, true, cacheSlots(cs, cacheBudget(opts.CacheBytes)))
	var bad error
	st.forEachCopied(func(c uint32) {
		if c >= geo.count {
			bad = fmt.Errorf("cow: reopen %q: store holds cluster %d of %d", h.Name, c, geo.count)
			return
		}
		s.cache.markCopied(c)
	})
	if bad != nil {
		s.pool.reserve(-s.cache.nslots)
		return nil, bad
	}
	if !h.Valid {
		s.inv.restore(h.Reason)
	}
	s.bookmark.Store(h.Bookmark)
	e.register(s)
	return s, nil
}

func (e *Engine) register(s *Snapshot) {
	e.mu.Lock()
	e.nextID++
	s.id = e.nextID
	e.byName[s.name] = s
	e.mu.Unlock()
	e.set = e.set.with(s)
	s.start()
}

// bufPool returns the shared buffer pool for a cluster size.
func (e *Engine) bufPool(csize int) *bufPool {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.pools[csize]
	if p == nil {
		p = newBufPool(csize)
		e.pools[csize] = p
	}
	return p
}

// Clear deletes a snapshot: copy-on-write stops for it, its writer stops
// (what is still cached is dropped) and its store is closed. The caller
// removes the store file.
func (e *Engine) Clear(name string) error {
	e.lockGate()
	if rb := e.rb.Load(); rb != nil && rb.src.name == name {
		e.gate.Unlock()
		return fmt.Errorf("cow: clear %q: %w from it", name, ErrRollback)
	}
	e.mu.Lock()
	s, ok := e.byName[name]
	if ok {
		delete(e.byName, name)
	}
	e.mu.Unlock()
	if !ok {
		e.gate.Unlock()
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	e.set = e.set.without(s)
	e.gate.Unlock()
	return s.stop(true)
}

// Bookmark drops the image of snapshot name but keeps it recording which
// clusters the origin writes (see "Changed blocks" in backstore's
// format.go), so that snapshots created later can report the changes since
// its create instant. It holds the gate like Create: no origin write is in
// flight, so everything copied is committed, and the store is turned into
// a bookmark between two commits. Reads of the snapshot fail with
// ErrBookmark from then on. Only a valid persistent snapshot can become a
// bookmark; one that already is one is left as it is. If the store cannot
// be changed the snapshot stays as it was, valid, and the error says why.
func (e *Engine) Bookmark(name string) error {
	e.lockGate()
	defer e.gate.Unlock()
	s, ok := e.Snapshot(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if !s.persistent {
		return fmt.Errorf("cow: bookmark %q: a transient snapshot cannot become a bookmark (it is not kept across a restart): %w", name, ErrBadOption)
	}
	if rb := e.rb.Load(); rb != nil && rb.src == s {
		return fmt.Errorf("cow: bookmark %q: %w from it", name, ErrRollback)
	}
	pending := s.commits.holdStore() // the store is ours: no commit starts meanwhile
	defer s.commits.releaseStore()
	switch {
	case s.inv.invalid.Load():
		return fmt.Errorf("cow: bookmark %q: %w", name, &invalidError{reason: s.inv.why()})
	case s.bookmark.Load():
		return nil
	case pending > 0:
		// Every origin write waits for its clusters' commit, and none is
		// in flight.
		return fmt.Errorf("cow: bookmark %q: %d clusters not committed with no origin write in flight", name, pending)
	}
	if err := s.st.bookmark(); err != nil {
		return fmt.Errorf("cow: bookmark %q: %w", name, err)
	}
	s.bookmark.Store(true)
	s.log.Info("snapshot turned into a bookmark")
	return nil
}

// Snapshot returns the snapshot called name.
func (e *Engine) Snapshot(name string) (*Snapshot, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s, ok := e.byName[name]
	return s, ok
}

// Snapshots returns every snapshot, oldest first.
func (e *Engine) Snapshots() []*Snapshot {
	e.mu.Lock()
	out := make([]*Snapshot, 0, len(e.byName))
	for _, s := range e.byName {
		out = append(out, s)
	}
	e.mu.Unlock()
	sortSnapshots(out)
	return out
}

// Close waits for requests in flight, refuses new ones, stops every writer
// after it committed what it holds, closes the stores and syncs the origin.
// It does not close the origin. The stores of snapshots given up by Abandon
// are left open (see Abandon).
func (e *Engine) Close() error {
	e.lockGate()
	defer e.gate.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	e.set = &snapSet{}
	// The rollback's copier restores under the gate: it is between two
	// clusters now, and stops at its next check. What it restored is
	// recorded before the stores close; the next start resumes.
	var errs []error
	if err := e.stopRollback(); err != nil {
		errs = append(errs, err)
	}
	// The snapshots stay listed while they stop, so that an Abandon under
	// way reaches a writer stuck in its last commit.
	for _, s := range e.Snapshots() {
		if err := s.stop(false); err != nil {
			errs = append(errs, err)
		}
	}
	e.mu.Lock()
	clear(e.byName)
	e.mu.Unlock()
	if err := e.origin.Sync(); err != nil {
		errs = append(errs, fmt.Errorf("cow: close: sync origin: %w", err))
	}
	return errors.Join(errs...)
}

// Abandon ends the wait for stores that have not caught up: it is how a stop
// that ran out of time (the daemon's --stop-timeout) ends without waiting
// for a slow or stalled disk. Every snapshot whose store is behind the
// origin requests (a commit in progress, clusters waiting for one, an
// invalidation not yet recorded) turns invalid for reason (one that already
// failed keeps its own), and the origin requests waiting for it are
// released once a persistent snapshot's invalidation is recorded with
// EngineOptions.RecordInvalid, on this goroutine; they then modify the
// origin without copying for it. Snapshots that are caught up are left
// alone, valid. Abandon never touches a store: see Snapshot.abandon.
//
// It returns the names of the snapshots it invalidated, oldest first, and
// an error for each it could not release (no RecordInvalid, or it failed):
// the requests waiting for those go on waiting for the store, without
// having touched the origin, and a caller that is stopping cuts them.
//
// Abandon does not wait for requests or for Close, and may run while either
// is under way. A Close after it (or under way) does not wait for the writer
// or a commit of a snapshot it invalidated and leaves that store open, so
// that a goroutine stuck in a store call cannot keep the caller from
// exiting. Requests that arrive afterwards are served as usual.
func (e *Engine) Abandon(reason string) ([]string, error) {
	var names []string
	var errs []error
	for _, s := range e.Snapshots() {
		invalidated, err := s.abandon(reason)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if invalidated {
			names = append(names, s.name)
		}
	}
	return names, errors.Join(errs...)
}

// readFull reads len(p) bytes at off; io.EOF after a full read is fine.
func readFull(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}
