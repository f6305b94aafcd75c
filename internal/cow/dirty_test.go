package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// Changed-block tracking (dirty.go), checked against a model.
//
// The model keeps the origin's bytes and, for every snapshot or bookmark
// (a "record"), its image at its create instant and the clusters (of its own
// size) touched by writes, trims and write-zeroes since: issued (marked
// before the engine call) and done (marked after it returned). At a create
// it also keeps, for every base the new snapshot should record (a live,
// valid, persistent snapshot or bookmark), that base's touched set then.
//
// The properties ("exact or absent"): whenever the engine answers,
//
//	(a) every byte that differs between the two images lies in a cluster
//	    reported changed;
//	(b) every cluster reported changed was touched between the base's
//	    create instant and the other end's (the other snapshot's create
//	    instant, or now for the origin);
//
// and, as dirty.go says the entries are exactly the clusters written, a
// cluster touched by a request that completed is reported changed
// (exactness). Bases and Tracked must list exactly what they should: a
// base is left out only when it was cleared, turned invalid, is transient,
// or fell beyond the 31 newest.
//
// Replay: -seed N, or DIRTY_SEED=N; DIRTY_SEEDS=N runs N seeds, DIRTY_OPS=N
// N operations per seed (the crash test: DIRTY_CRASHES=N crash points).

// dirtyEnvInt reads a positive integer from the environment (0: unset).
func dirtyEnvInt(t testing.TB, name string) uint64 {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return 0
	}
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

// dirtySeeds is the seeds a dirty test runs: -seed or DIRTY_SEED alone,
// else DIRTY_SEEDS (or n) seeds from base.
func dirtySeeds(t testing.TB, n int, base uint64) []uint64 {
	if *seedFlag != 0 {
		return []uint64{*seedFlag}
	}
	if s := dirtyEnvInt(t, "DIRTY_SEED"); s != 0 {
		return []uint64{s}
	}
	if k := dirtyEnvInt(t, "DIRTY_SEEDS"); k != 0 {
		n = int(k)
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = base + uint64(i)
	}
	return out
}

// dirtyReplay reports whether one seed is replayed.
func dirtyReplay(t testing.TB) bool {
	return *seedFlag != 0 || dirtyEnvInt(t, "DIRTY_SEED") != 0
}

// dirtyRec is one create attempt of the model: a snapshot or bookmark.
type dirtyRec struct {
	seq        int
	name       string
	uuid       uuid.UUID
	csize      int
	geo        geometry
	persistent bool
	maxSize    int64
	frozen     []byte // the origin at the create instant
	// issued and done: clusters of geo touched by requests issued (marked
	// before the call) and completed (after it) since the create.
	issued, done []bool
	bases        []dirtyBaseAt // the bases the create should record, oldest first
	s            *Snapshot     // in the current engine

	// Guarded by dirtyWorld.mu (the crash hook reads them).
	created        bool // Create returned
	clearIssued    bool
	cleared        bool // Clear returned, or dropped at a restart (transient)
	bookmarkIssued bool
	bookmark       bool // Bookmark returned
}

// dirtyBaseAt is a base as a create saw it: what it had touched then.
type dirtyBaseAt struct {
	b       *dirtyRec
	touched []bool
}

type dirtyStats struct {
	ops, writes, creates, clears, bookmarks, restarts, invalid int
	pairs, bookmarkPairs, mixedPairs, originPairs              int
	changedClusters, unchangedClusters                         int
	maxBases, subRanges                                        int
}

func (s *dirtyStats) add(o dirtyStats) {
	s.ops += o.ops
	s.writes += o.writes
	s.creates += o.creates
	s.clears += o.clears
	s.bookmarks += o.bookmarks
	s.restarts += o.restarts
	s.invalid += o.invalid
	s.pairs += o.pairs
	s.bookmarkPairs += o.bookmarkPairs
	s.mixedPairs += o.mixedPairs
	s.originPairs += o.originPairs
	s.changedClusters += o.changedClusters
	s.unchangedClusters += o.unchangedClusters
	s.maxBases = max(s.maxBases, o.maxBases)
	s.subRanges += o.subRanges
}

func (s dirtyStats) String() string {
	return fmt.Sprintf("%d ops (%d writes, %d creates, %d clears, %d bookmarks, %d restarts, %d invalidated); checked %d snapshot pairs (%d against a bookmark, %d of two cluster sizes), %d origin pairs, %d clusters changed / %d unchanged, %d sub-range answers; at most %d bases at once",
		s.ops, s.writes, s.creates, s.clears, s.bookmarks, s.restarts, s.invalid, s.pairs, s.bookmarkPairs, s.mixedPairs,
		s.originPairs, s.changedClusters, s.unchangedClusters, s.subRanges, s.maxBases)
}

// dirtyConfig parameterises a run.
type dirtyConfig struct {
	size      int64
	csizes    []int
	maxLive   int
	names     int     // name pool (names are reused after a clear)
	transient float64 // chance a create is transient
	maxSize   float64 // chance a create gets a small MaxSize (it turns invalid when full)
	ops       int
	// createFirst: creates (each followed by a write) before the random
	// operations, to reach many live snapshots.
	createFirst int
	checkEvery  int  // check every pair every so many ops
	fullEvery   int  // also read every image from the engine every so many ops
	reader      bool // a concurrent reader of Changed, ChangedSince, Bases, Tracked
}

// dirtyWorld is the engine under test and its model.
type dirtyWorld struct {
	t      testing.TB
	seed   uint64
	cfg    dirtyConfig
	rng    *rand.Rand
	log    *opLog
	ctx    context.Context
	fs     *vfstest.MemFS
	origin vfs.File
	e      *Engine
	cur    []byte // the origin as acknowledged
	buf    []byte

	mu   sync.Mutex // guards the model against the crash hook
	live []*dirtyRec
	all  []*dirtyRec
	uuid map[string]*dirtyRec

	invalidSeen map[*dirtyRec]bool

	engine atomic.Pointer[Engine] // for the reader

	stats dirtyStats
}

const dirtyOriginID = "dirty"

func newDirtyWorld(t testing.TB, seed uint64, cfg dirtyConfig, log *opLog) *dirtyWorld {
	t.Helper()
	w := &dirtyWorld{
		t: t, seed: seed, cfg: cfg, log: log, ctx: context.Background(),
		rng:  rand.New(rand.NewPCG(seed, 0xd1e7)),
		fs:   vfstest.NewMemFS(),
		uuid: make(map[string]*dirtyRec),

		invalidSeen: make(map[*dirtyRec]bool),
	}
	w.origin = mustOpen(t, w.fs, "origin")
	w.cur = make([]byte, cfg.size)
	fillRandom(w.rng, w.cur)
	if _, err := w.origin.WriteAt(w.cur, 0); err != nil {
		t.Fatal(err)
	}
	if err := w.origin.Sync(); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(w.origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w.e = e
	w.engine.Store(e)
	w.buf = make([]byte, cfg.size)
	return w
}

func (w *dirtyWorld) fatalf(format string, args ...any) {
	w.t.Helper()
	w.t.Fatalf("seed %d: "+format, append([]any{w.seed}, args...)...)
}

// mark sets the clusters of every live record touched by [off, off+n).
func (w *dirtyWorld) mark(off, n int64, done bool) {
	if n <= 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range w.live {
		set := r.issued
		if done {
			set = r.done
		}
		first, last := r.geo.span(off, n)
		for c := first; c <= last; c++ {
			set[c] = true
		}
	}
}

// randRange draws a request: small and unaligned, a few clusters, or large.
func (w *dirtyWorld) randRange() (int64, int64) {
	r := w.rng
	var n int64
	switch k := r.IntN(10); {
	case k < 3:
		n = 1 + r.Int64N(700)
	case k < 8:
		n = 1 + r.Int64N(3*16<<10)
	case k < 9:
		n = 1 + r.Int64N(w.cfg.size/4)
	default: // cluster-aligned
		cs := int64(w.cfg.csizes[r.IntN(len(w.cfg.csizes))])
		n = cs * (1 + r.Int64N(3))
		n = min(n, w.cfg.size)
		off := r.Int64N((w.cfg.size-n)/cs+1) * cs
		return off, n
	}
	n = min(n, w.cfg.size)
	return r.Int64N(w.cfg.size - n + 1), n
}

// modify issues a write (kind 0), trim (1) or write-zeroes (2).
func (w *dirtyWorld) modify(kind int, off, n int64) {
	w.stats.writes++
	fua := w.rng.IntN(8) == 0
	p := w.buf[:n]
	if kind == 0 {
		fillRandom(w.rng, p)
	}
	w.mark(off, n, false)
	var err error
	switch kind {
	case 0:
		err = w.e.WriteAt(w.ctx, p, off, fua)
	case 1:
		err = w.e.Trim(w.ctx, off, n, fua)
	default:
		err = w.e.Zero(w.ctx, off, n, fua)
	}
	w.log.add("modify kind=%d off=%d n=%d fua=%v err=%v", kind, off, n, fua, err)
	if err != nil {
		w.fatalf("modify kind %d off=%d n=%d: %v", kind, off, n, err)
	}
	if kind == 0 {
		copy(w.cur[off:], p)
	} else {
		clear(w.cur[off : off+n])
	}
	w.mark(off, n, true)
}

// valid reports the engine's view of r's validity; only a record with a
// MaxSize may ever turn invalid. (Info runs while a transient snapshot's
// writer may be recording its invalidation: see TestInfoConcurrentBookmark.)
func (w *dirtyWorld) valid(r *dirtyRec) bool {
	info := r.s.Info()
	valid := info.Valid
	if !valid && r.maxSize == 0 {
		w.fatalf("%s (%s) turned invalid without a MaxSize: %s", r.name, r.uuid, info.Reason)
	}
	if !valid && !w.invalidSeen[r] {
		w.invalidSeen[r] = true
		w.stats.invalid++
	}
	return valid
}

func (w *dirtyWorld) freeName() (string, bool) {
	used := map[string]bool{}
	for _, r := range w.live {
		used[r.name] = true
	}
	var free []string
	for i := range w.cfg.names {
		if n := fmt.Sprintf("n%d", i); !used[n] {
			free = append(free, n)
		}
	}
	if len(free) == 0 {
		return "", false
	}
	return free[w.rng.IntN(len(free))], true
}

func (w *dirtyWorld) create() {
	if len(w.live) >= w.cfg.maxLive {
		return
	}
	name, ok := w.freeName()
	if !ok {
		return
	}
	w.stats.creates++
	r := &dirtyRec{
		name:       name,
		csize:      w.cfg.csizes[w.rng.IntN(len(w.cfg.csizes))],
		persistent: w.rng.Float64() >= w.cfg.transient,
		frozen:     bytes.Clone(w.cur),
	}
	for i := range r.uuid {
		r.uuid[i] = byte(w.rng.Uint32())
	}
	r.uuid[6] = r.uuid[6]&0x0f | 0x40
	r.uuid[8] = r.uuid[8]&0x3f | 0x80
	r.geo = geometryOf(w.cfg.size, r.csize)
	r.issued = make([]bool, r.geo.count)
	r.done = make([]bool, r.geo.count)
	if w.rng.Float64() < w.cfg.maxSize {
		// Room for the header, the metadata and a few clusters.
		r.maxSize = 32<<10 + int64(r.csize)*(1+w.rng.Int64N(8))
	}
	if r.persistent {
		for _, b := range w.live {
			if b.persistent && w.valid(b) {
				r.bases = append(r.bases, dirtyBaseAt{b: b, touched: slices.Clone(b.done)})
			}
		}
	}
	_ = w.fs.Remove(name) // a file left by a transient snapshot
	f := mustOpen(w.t, w.fs, name)
	w.mu.Lock()
	r.seq = len(w.all)
	w.all = append(w.all, r)
	w.uuid[r.uuid.String()] = r
	w.mu.Unlock()
	s, err := w.e.Create(w.ctx, f, SnapshotOptions{
		Name: name, ClusterSize: r.csize, Transient: !r.persistent, MaxSize: r.maxSize,
		OriginID: dirtyOriginID, UUID: r.uuid, CacheBytes: int64(w.rng.IntN(3)) * 64 << 10,
	})
	w.log.add("create %s uuid=%s cs=%d persistent=%v maxSize=%d bases=%d err=%v", name, r.uuid, r.csize, r.persistent, r.maxSize, len(r.bases), err)
	if err != nil {
		w.fatalf("create %s: %v", name, err)
	}
	r.s = s
	w.mu.Lock()
	r.created = true
	w.live = append(w.live, r)
	w.mu.Unlock()
}

func (w *dirtyWorld) pick() *dirtyRec {
	if len(w.live) == 0 {
		return nil
	}
	return w.live[w.rng.IntN(len(w.live))]
}

func (w *dirtyWorld) clearOne() {
	r := w.pick()
	if r == nil {
		return
	}
	w.stats.clears++
	w.mu.Lock()
	r.clearIssued = true
	w.mu.Unlock()
	err := w.e.Clear(r.name)
	w.log.add("clear %s err=%v", r.name, err)
	if err != nil {
		w.fatalf("clear %s: %v", r.name, err)
	}
	w.mu.Lock()
	r.cleared = true
	w.live = slices.DeleteFunc(w.live, func(x *dirtyRec) bool { return x == r })
	w.mu.Unlock()
	if err := w.fs.Remove(r.name); err != nil {
		w.fatalf("remove %s: %v", r.name, err)
	}
}

func (w *dirtyWorld) bookmarkOne() {
	r := w.pick()
	if r == nil {
		return
	}
	valid := w.valid(r)
	if r.persistent && valid {
		w.mu.Lock()
		r.bookmarkIssued = true
		w.mu.Unlock()
	}
	err := w.e.Bookmark(r.name)
	w.log.add("bookmark %s err=%v", r.name, err)
	switch {
	case !r.persistent:
		if !errors.Is(err, ErrBadOption) {
			w.fatalf("bookmark of transient %s: %v, want ErrBadOption", r.name, err)
		}
	case !valid:
		if !errors.Is(err, ErrInvalid) {
			w.fatalf("bookmark of invalid %s: %v, want ErrInvalid", r.name, err)
		}
	case err != nil:
		w.fatalf("bookmark %s: %v", r.name, err)
	default:
		if !r.bookmark {
			w.stats.bookmarks++
		}
		w.mu.Lock()
		r.bookmark = true
		w.mu.Unlock()
		if err := r.s.ReadAt(w.ctx, w.buf[:1], 0); !errors.Is(err, ErrBookmark) {
			w.fatalf("read of bookmark %s: %v, want ErrBookmark", r.name, err)
		}
	}
}

// restart closes the engine and reopens every persistent store, in
// creation order, on a new engine (transient snapshots are gone).
func (w *dirtyWorld) restart() {
	w.stats.restarts++
	valid := map[*dirtyRec]bool{}
	for _, r := range w.live {
		valid[r] = w.valid(r)
	}
	err := w.e.Close()
	w.log.add("restart: close err=%v", err)
	if err != nil {
		w.fatalf("close: %v", err)
	}
	e, err := NewEngine(w.origin, EngineOptions{})
	if err != nil {
		w.fatalf("new engine: %v", err)
	}
	var live []*dirtyRec
	var dropped []*dirtyRec
	for _, r := range w.live {
		if !r.persistent {
			dropped = append(dropped, r)
			if err := w.fs.Remove(r.name); err != nil {
				w.fatalf("remove %s: %v", r.name, err)
			}
			continue
		}
		f, err := w.fs.OpenFile(r.name, os.O_RDWR, 0)
		if err != nil {
			w.fatalf("open store %s: %v", r.name, err)
		}
		s, err := e.Reopen(w.ctx, f, ReopenOptions{OriginID: dirtyOriginID, CacheBytes: int64(w.rng.IntN(3)) * 64 << 10})
		w.log.add("reopen %s err=%v", r.name, err)
		if err != nil {
			w.fatalf("reopen %s: %v", r.name, err)
		}
		info := s.Info()
		switch {
		case info.UUID != r.uuid.String():
			w.fatalf("reopen %s: UUID %s, want %s", r.name, info.UUID, r.uuid)
		case info.Bookmark != r.bookmark:
			w.fatalf("reopen %s: bookmark %v, want %v", r.name, info.Bookmark, r.bookmark)
		case info.Valid != valid[r]:
			w.fatalf("reopen %s: valid %v, was %v before the restart (%s)", r.name, info.Valid, valid[r], info.Reason)
		}
		r.s = s
		live = append(live, r)
	}
	w.mu.Lock()
	for _, r := range dropped {
		r.cleared = true
	}
	w.live = live
	w.e = e
	w.mu.Unlock()
	w.engine.Store(e)
}

// step runs one random operation.
func (w *dirtyWorld) step() {
	w.stats.ops++
	switch k := w.rng.IntN(100); {
	case k < 50:
		off, n := w.randRange()
		w.modify(0, off, n)
	case k < 56:
		off, n := w.randRange()
		w.modify(1, off, n)
	case k < 62:
		off, n := w.randRange()
		w.modify(2, off, n)
	case k < 64: // empty requests copy nothing
		off := w.rng.Int64N(w.cfg.size + 1)
		var err error
		switch w.rng.IntN(3) {
		case 0:
			err = w.e.WriteAt(w.ctx, nil, off, false)
		case 1:
			err = w.e.Trim(w.ctx, off, 0, false)
		default:
			err = w.e.Zero(w.ctx, off, 0, false)
		}
		w.log.add("empty request off=%d err=%v", off, err)
		if err != nil {
			w.fatalf("empty request at %d: %v", off, err)
		}
	case k < 68:
		err := w.e.Flush(w.ctx)
		w.log.add("flush err=%v", err)
		if err != nil {
			w.fatalf("flush: %v", err)
		}
	case k < 80:
		w.create()
	case k < 85:
		w.clearOne()
	case k < 91:
		w.bookmarkOne()
	case k < 94:
		w.restart()
	default: // another write
		off, n := w.randRange()
		w.modify(0, off, n)
	}
}

// dirtyCollect asks call for the whole device, in as many calls as it
// takes, checks the shape of every answer and returns one flag per
// cluster of g.
func dirtyCollect(g geometry, call func(off, n int64) ([]ChangedRun, error)) ([]bool, error) {
	ch := make([]int8, g.count)
	for i := range ch {
		ch[i] = -1
	}
	for off := int64(0); off < g.size; {
		runs, err := call(off, g.size-off)
		if err != nil {
			return nil, err
		}
		n, err := dirtyApplyRuns(g, off, g.size-off, runs, ch)
		if err != nil {
			return nil, err
		}
		off += n
	}
	out := make([]bool, g.count)
	for c, v := range ch {
		if v < 0 {
			return nil, fmt.Errorf("cluster %d not covered", c)
		}
		out[c] = v == 1
	}
	return out, nil
}

// dirtyApplyRuns checks one answer for [off, off+length) at g's
// granularity and records it in ch (-1: not yet known): runs of positive
// length, from off, no further than asked, a whole number of clusters
// unless the answer reaches the end asked, never a cluster both changed
// and not. It returns the bytes covered.
func dirtyApplyRuns(g geometry, off, length int64, runs []ChangedRun, ch []int8) (int64, error) {
	pos, end := off, off+length
	for i, r := range runs {
		if r.Length <= 0 {
			return 0, fmt.Errorf("run %d of %d has length %d", i, len(runs), r.Length)
		}
		if pos+r.Length > end {
			return 0, fmt.Errorf("runs reach %d, past the end asked %d", pos+r.Length, end)
		}
		v := int8(0)
		if r.Changed {
			v = 1
		}
		first, last := g.span(pos, r.Length)
		for c := first; c <= last; c++ {
			if ch[c] >= 0 && ch[c] != v {
				return 0, fmt.Errorf("cluster %d (of %d bytes) reported both changed and unchanged (run %d at %d)", c, g.csize, i, pos)
			}
			ch[c] = v
		}
		pos += r.Length
	}
	if pos == off {
		return 0, fmt.Errorf("an answer for [%d, %d) covers nothing", off, end)
	}
	if pos < end && pos%int64(g.csize) != 0 {
		return 0, fmt.Errorf("a short answer for [%d, %d) ends at %d, inside a cluster of %d bytes", off, end, pos, g.csize)
	}
	return pos - off, nil
}

// dirtyCheckPair checks an answer: changed, one flag per cluster of g,
// against two images (a), an upper bound (b) and, if lower is not nil, a
// lower bound (exactness).
func dirtyCheckPair(g geometry, changed []bool, imgA, imgB []byte, upper, lower []bool) error {
	for c := uint32(0); c < g.count; c++ {
		lo := g.off(c)
		hi := lo + int64(g.clusterLen(c))
		switch {
		case !changed[c] && !bytes.Equal(imgA[lo:hi], imgB[lo:hi]):
			return fmt.Errorf("(a) cluster %d [%d, %d) differs (at +%d) but is reported unchanged", c, lo, hi, firstDiff(imgA[lo:hi], imgB[lo:hi]))
		case changed[c] && !upper[c]:
			return fmt.Errorf("(b) cluster %d [%d, %d) is reported changed but no request touched it in between", c, lo, hi)
		case lower != nil && lower[c] && !changed[c]:
			return fmt.Errorf("(exactness) cluster %d [%d, %d) was written in between but is reported unchanged", c, lo, hi)
		}
	}
	return nil
}

func countTrue(b []bool) (n int) {
	for _, v := range b {
		if v {
			n++
		}
	}
	return n
}

// dirtyEnd is one live snapshot or bookmark as the checks see it.
type dirtyEnd struct {
	r        *dirtyRec
	s        *Snapshot
	valid    bool
	bookmark bool
	img      []byte // its image: read from the engine, or the model's for a bookmark
	// upper and lower bound the origin's changes since it (lower nil: no
	// exactness check).
	upper, lower []bool
}

// dirtyCheckEngine checks Tracked, ChangedSince, Bases and Changed of every
// live end against the model; origin is the origin's content now.
func dirtyCheckEngine(ctx context.Context, st *dirtyStats, rng *rand.Rand, e *Engine, origin []byte, ends []dirtyEnd) error {
	byRec := map[*dirtyRec]*dirtyEnd{}
	for i := range ends {
		byRec[ends[i].r] = &ends[i]
	}
	size := int64(len(origin))

	// Tracked: the live, valid, persistent ones, in engine order.
	var want []Base
	for _, d := range ends {
		if d.r.persistent && d.valid {
			want = append(want, Base{Name: d.r.name, UUID: d.r.uuid.String(), Granularity: d.r.csize})
		}
	}
	if got := e.Tracked(); !slices.Equal(got, want) {
		return fmt.Errorf("Tracked() = %v, want %v", got, want)
	}
	for _, d := range ends {
		call := func(off, n int64) ([]ChangedRun, error) { return e.ChangedSince(ctx, d.r.name, off, n) }
		if !d.r.persistent || !d.valid {
			if _, err := call(0, size); !errors.Is(err, ErrNoBase) {
				return fmt.Errorf("ChangedSince(%s) (persistent %v, valid %v): %v, want ErrNoBase", d.r.name, d.r.persistent, d.valid, err)
			}
			continue
		}
		changed, err := dirtyCollect(d.r.geo, call)
		if err != nil {
			return fmt.Errorf("ChangedSince(%s): %w", d.r.name, err)
		}
		if err := dirtyCheckPair(d.r.geo, changed, origin, d.img, d.upper, d.lower); err != nil {
			return fmt.Errorf("ChangedSince(%s) (cluster size %d): %w", d.r.name, d.r.csize, err)
		}
		st.originPairs++
	}

	for _, d := range ends {
		s := d.r
		got := d.s.Bases()
		if !s.persistent || !d.valid || d.bookmark {
			if len(got) != 0 {
				return fmt.Errorf("%s (persistent %v, valid %v, bookmark %v) has bases %v", s.name, s.persistent, d.valid, d.bookmark, got)
			}
			for _, x := range ends {
				if x.r != s {
					if _, err := d.s.Changed(ctx, x.r.name, 0, size); err == nil {
						return fmt.Errorf("%s (persistent %v, valid %v, bookmark %v) answers changes since %s", s.name, s.persistent, d.valid, d.bookmark, x.r.name)
					}
				}
			}
			continue
		}
		// Recorded at the create: the 31 newest eligible; reported now:
		// those still live and valid.
		recorded := s.bases[max(0, len(s.bases)-maxBases):]
		var want []Base
		var wantAt []dirtyBaseAt
		for _, ba := range recorded {
			if b := byRec[ba.b]; b != nil && b.valid {
				want = append(want, Base{Name: ba.b.name, UUID: ba.b.uuid.String(), Granularity: ba.b.csize})
				wantAt = append(wantAt, ba)
			}
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("%s.Bases() = %v, want %v (recorded at its create: %d eligible)", s.name, got, want, len(s.bases))
		}
		st.maxBases = max(st.maxBases, len(got))
		for _, ba := range wantAt {
			b := byRec[ba.b]
			call := func(off, n int64) ([]ChangedRun, error) { return d.s.Changed(ctx, ba.b.name, off, n) }
			changed, err := dirtyCollect(ba.b.geo, call)
			if err != nil {
				return fmt.Errorf("%s.Changed(%s): %w", s.name, ba.b.name, err)
			}
			// Every request between the two create instants completed.
			if err := dirtyCheckPair(ba.b.geo, changed, d.img, b.img, ba.touched, ba.touched); err != nil {
				return fmt.Errorf("%s.Changed(%s) (cluster sizes %d and %d): %w", s.name, ba.b.name, s.csize, ba.b.csize, err)
			}
			st.pairs++
			if b.bookmark {
				st.bookmarkPairs++
			}
			if ba.b.csize != s.csize {
				st.mixedPairs++
			}
			n := countTrue(changed)
			st.changedClusters += n
			st.unchangedClusters += len(changed) - n
			// A random sub-range, unaligned: the same answer, restricted.
			off := rng.Int64N(size)
			length := 1 + rng.Int64N(size-off)
			runs, err := d.s.Changed(ctx, ba.b.name, off, length)
			if err != nil {
				return fmt.Errorf("%s.Changed(%s, %d, %d): %w", s.name, ba.b.name, off, length, err)
			}
			sub := make([]int8, ba.b.geo.count)
			for i := range sub {
				sub[i] = -1
			}
			if _, err := dirtyApplyRuns(ba.b.geo, off, length, runs, sub); err != nil {
				return fmt.Errorf("%s.Changed(%s, %d, %d): %w", s.name, ba.b.name, off, length, err)
			}
			for c, v := range sub {
				if v >= 0 && (v == 1) != changed[c] {
					return fmt.Errorf("%s.Changed(%s, %d, %d): cluster %d is %v, %v over the whole device", s.name, ba.b.name, off, length, c, v == 1, changed[c])
				}
			}
			st.subRanges++
		}
		// Everything else is refused.
		for _, x := range ends {
			if x.r == s || slices.ContainsFunc(wantAt, func(ba dirtyBaseAt) bool { return ba.b == x.r }) {
				continue
			}
			if _, err := d.s.Changed(ctx, x.r.name, 0, size); !errors.Is(err, ErrNoBase) {
				return fmt.Errorf("%s.Changed(%s), not a base: %v, want ErrNoBase", s.name, x.r.name, err)
			}
		}
	}
	return nil
}

// check runs the checks on the live engine. full also reads every
// readable image from the engine (otherwise the model's images stand in).
func (w *dirtyWorld) check(full bool) {
	w.t.Helper()
	ends := make([]dirtyEnd, 0, len(w.live))
	for _, r := range w.live {
		d := dirtyEnd{r: r, s: r.s, valid: w.valid(r), bookmark: r.bookmark, img: r.frozen, upper: r.issued, lower: r.done}
		if full && d.valid && !r.bookmark {
			img := make([]byte, w.cfg.size)
			if err := r.s.ReadAt(w.ctx, img, 0); err != nil {
				if !r.persistent && r.maxSize > 0 && errors.Is(err, ErrInvalid) {
					// A transient store fills on the writer
					// goroutine, after the request returned.
					ends = append(ends, d)
					continue
				}
				w.fatalf("read %s: %v", r.name, err)
			}
			if !bytes.Equal(img, r.frozen) {
				w.fatalf("%s differs from its image at %d", r.name, firstDiff(img, r.frozen))
			}
		}
		ends = append(ends, d)
	}
	if full {
		if err := w.e.ReadAt(w.ctx, w.buf, 0); err != nil {
			w.fatalf("read origin: %v", err)
		}
		if !bytes.Equal(w.buf, w.cur) {
			w.fatalf("origin differs from the model at %d", firstDiff(w.buf, w.cur))
		}
	}
	if err := dirtyCheckEngine(w.ctx, &w.stats, w.rng, w.e, w.cur, ends); err != nil {
		w.fatalf("after op %d: %v", w.stats.ops, err)
	}
}

// dirtyReader runs alongside a workload: it asks Bases, Changed, Tracked
// and ChangedSince of whatever lives, and checks that every answer is
// well formed, that a snapshot's answer against a base never changes
// (the base's entries below the recorded count are fixed) and that the
// origin's changes since a snapshot only grow.
type dirtyReader struct {
	w       *dirtyWorld
	pairs   map[[2]string][]bool
	origin  map[string][]bool
	answers int
	err     error
}

func (rd *dirtyReader) run(stop <-chan struct{}) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(rd.w.seed, 0x4ead))
	size := rd.w.cfg.size
	for {
		select {
		case <-stop:
			return
		default:
		}
		e := rd.w.engine.Load()
		snaps := e.Snapshots()
		if len(snaps) > 0 {
			s := snaps[r.IntN(len(snaps))]
			for _, b := range s.Bases() {
				g := geometryOf(size, b.Granularity)
				changed, err := dirtyCollect(g, func(off, n int64) ([]ChangedRun, error) { return s.Changed(ctx, b.Name, off, n) })
				if err != nil {
					if !errors.Is(err, ErrNoBase) && !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrNotFound) {
						rd.err = fmt.Errorf("concurrent %s.Changed(%s): %w", s.Name(), b.Name, err)
						return
					}
					continue
				}
				rd.answers++
				key := [2]string{s.hdr.UUID, b.UUID}
				if prev, ok := rd.pairs[key]; !ok {
					rd.pairs[key] = changed
				} else if !slices.Equal(prev, changed) {
					rd.err = fmt.Errorf("concurrent %s.Changed(%s): the answer changed", s.Name(), b.Name)
					return
				}
			}
		}
		if tr := e.Tracked(); len(tr) > 0 {
			b := tr[r.IntN(len(tr))]
			g := geometryOf(size, b.Granularity)
			changed, err := dirtyCollect(g, func(off, n int64) ([]ChangedRun, error) { return e.ChangedSince(ctx, b.Name, off, n) })
			switch {
			case err != nil && !errors.Is(err, ErrNoBase) && !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrNotFound):
				rd.err = fmt.Errorf("concurrent ChangedSince(%s): %w", b.Name, err)
				return
			case err == nil:
				rd.answers++
				if prev := rd.origin[b.UUID]; prev != nil {
					for c := range prev {
						if prev[c] && !changed[c] {
							rd.err = fmt.Errorf("concurrent ChangedSince(%s): cluster %d was reported changed, now not", b.Name, c)
							return
						}
					}
				}
				rd.origin[b.UUID] = changed
			}
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// runDirtyModel runs one seed of the model.
func runDirtyModel(t *testing.T, seed uint64, cfg dirtyConfig) dirtyStats {
	t.Helper()
	log := &opLog{}
	defer func() {
		if t.Failed() {
			log.keep(t, seed)
			t.Logf("replay: DIRTY_SEED=%d go test -race -run '%s' ./internal/cow/", seed, t.Name())
		}
	}()
	w := newDirtyWorld(t, seed, cfg, log)
	var rd *dirtyReader
	stopReader := func() {}
	if cfg.reader {
		rd = &dirtyReader{w: w, pairs: map[[2]string][]bool{}, origin: map[string][]bool{}}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() { rd.run(stop) })
		var once sync.Once
		stopReader = func() {
			once.Do(func() { close(stop) })
			wg.Wait()
		}
	}
	defer func() {
		stopReader()
		if rd != nil && rd.err != nil {
			t.Errorf("seed %d: %v", seed, rd.err)
		}
		if err := w.e.Close(); err != nil {
			t.Errorf("seed %d: close: %v", seed, err)
		}
	}()
	w.create()
	for range cfg.createFirst {
		w.create()
		off, n := w.randRange()
		w.modify(0, off, n)
	}
	w.check(true)
	for i := range cfg.ops {
		w.step()
		if (i+1)%cfg.checkEvery == 0 {
			w.check((i+1)%cfg.fullEvery == 0)
		}
	}
	w.check(true)
	w.restart()
	w.check(true)
	if rd != nil {
		stopReader()
		if rd.err == nil {
			t.Logf("seed %d: the concurrent reader got %d answers", seed, rd.answers)
		}
	}
	return w.stats
}

// TestChangedModel runs random workloads of writes, trims, write-zeroes,
// creates (persistent and transient, 4, 8 and 16 KiB clusters, some with a
// MaxSize that fills), clears (names reused), bookmarks and restarts, over
// an origin that is not a whole number of clusters, and after every
// operation checks every pair the engine advertises (see the comment at the
// top of this file). A second configuration keeps more than 31 snapshots
// alive, so that the base table's limit is reached.
func TestChangedModel(t *testing.T) {
	seedsN, ops := 3, 200
	if testing.Short() {
		seedsN, ops = 2, 100
	}
	if n := dirtyEnvInt(t, "DIRTY_OPS"); n != 0 {
		ops = int(n)
	}
	configs := []struct {
		name  string
		seeds int
		cfg   dirtyConfig
	}{
		{"mixed", seedsN, dirtyConfig{
			size: 384<<10 + 1234, csizes: []int{4 << 10, 16 << 10, 4 << 10, 8 << 10}, maxLive: 8, names: 10,
			transient: 0.2, maxSize: 0.25, ops: ops, checkEvery: 1, fullEvery: 10, reader: true,
		}},
		{"many", 1, dirtyConfig{
			size: 192<<10 + 777, csizes: []int{4 << 10, 16 << 10}, maxLive: 36, names: 40,
			transient: 0.05, maxSize: 0.05, ops: ops / 2, createFirst: 34, checkEvery: 10, fullEvery: 30,
		}},
	}
	var total dirtyStats
	for ci, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			var st dirtyStats
			for _, seed := range dirtySeeds(t, c.seeds, uint64(0xd17700+ci*1000)) {
				st.add(runDirtyModel(t, seed, c.cfg))
				if t.Failed() {
					return
				}
			}
			t.Logf("%v", st)
			total.add(st)
			if c.name == "many" && !dirtyReplay(t) && st.maxBases < maxBases {
				t.Errorf("no snapshot reached %d bases: %v", maxBases, st)
			}
		})
	}
	if !t.Failed() && !dirtyReplay(t) && (total.bookmarkPairs == 0 || total.mixedPairs == 0 || total.restarts == 0 || total.changedClusters == 0) {
		t.Errorf("the workloads missed a case: %v", total)
	}
}

// TestChangedSinceConcurrentClear asks ChangedSince of a snapshot while it
// is cleared. Run it with -race: Snapshot.stop releases the copied bitmap
// (sets it to nil), which ChangedSince reads; without b.life held shared
// that is a data race, and a call between its tracks() check and the read
// could index a nil bitmap.
func TestChangedSinceConcurrentClear(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	const size = 256<<10 + 100
	e, _, _ := testEngine(t, fs, size, 1, true)
	defer e.Close()
	answers := 0
	for i := range 30 {
		name := fmt.Sprintf("b%d", i)
		if _, err := e.Create(ctx, mustOpen(t, fs, name), SnapshotOptions{Name: name, ClusterSize: 4 << 10}); err != nil {
			t.Fatal(err)
		}
		if err := e.WriteAt(ctx, []byte{1}, int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
		started := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			close(started)
			for {
				runs, err := e.ChangedSince(ctx, name, 0, size)
				if err != nil {
					if !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrNoBase) && !errors.Is(err, ErrInvalid) {
						t.Errorf("ChangedSince(%s): %v", name, err)
					}
					return
				}
				answers++
				if len(runs) == 0 {
					t.Errorf("ChangedSince(%s): no runs", name)
					return
				}
			}
		})
		<-started
		if err := e.Clear(name); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
	}
	t.Logf("%d answers before the clears", answers)
}

// TestBasesNewestAfterReopen keeps more than 31 persistent snapshots,
// reopens them in the reverse of their creation order and checks that a
// new snapshot records the 31 newest (by create instant) as bases, not the
// 31 last reopened.
func TestBasesNewestAfterReopen(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	const size = 64<<10 + 100
	e, origin, _ := testEngine(t, fs, size, 1, true)
	const n = maxBases + 3
	var names []string
	for i := range n {
		name := fmt.Sprintf("b%02d", i)
		names = append(names, name)
		if _, err := e.Create(ctx, mustOpen(t, fs, name), SnapshotOptions{Name: name, ClusterSize: 4 << 10}); err != nil {
			t.Fatal(err)
		}
		if err := e.WriteAt(ctx, []byte{byte(i)}, int64(i%16)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for i := n - 1; i >= 0; i-- {
		f, err := fs.OpenFile(names[i], os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.Reopen(ctx, f, ReopenOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	s, err := e.Create(ctx, mustOpen(t, fs, "s"), SnapshotOptions{Name: "s", ClusterSize: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, b := range s.Bases() {
		got = append(got, b.Name)
	}
	slices.Sort(got)
	want := names[n-maxBases:]
	if !slices.Equal(got, want) {
		t.Errorf("bases of a snapshot created after a reopen in reverse order: %v, want the %d newest %v", got, maxBases, want)
	}
}

// TestInfoConcurrentBookmark reads a snapshot's Info while it turns into a
// bookmark. Run it with -race: backstore's Store.Bytes (which Info calls)
// reads the header's Bookmark flag, which the header write of Bookmark (and
// of Invalidate, which the writer goroutine runs for a failed snapshot while
// Info may be called) replaces; it must read it under the store's lock.
func TestInfoConcurrentBookmark(t *testing.T) {
	ctx := context.Background()
	fs := vfstest.NewMemFS()
	const size = 64<<10 + 100
	e, _, _ := testEngine(t, fs, size, 1, true)
	defer e.Close()
	for i := range 10 {
		name := fmt.Sprintf("b%d", i)
		s, err := e.Create(ctx, mustOpen(t, fs, name), SnapshotOptions{Name: name, ClusterSize: 4 << 10})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.WriteAt(ctx, []byte{1}, int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
		before := s.Info().StoreBytes
		started := make(chan struct{})
		done := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			close(started)
			for {
				select {
				case <-done:
					return
				default:
				}
				_ = s.Info()
			}
		})
		<-started
		if err := e.Bookmark(name); err != nil {
			t.Fatal(err)
		}
		close(done)
		wg.Wait()
		if info := s.Info(); !info.Bookmark || info.StoreBytes >= before {
			t.Errorf("%s: Info after Bookmark: bookmark %v, %d store bytes (%d before)", name, info.Bookmark, info.StoreBytes, before)
		}
	}
}
