package cow

import (
	"context"
	"fmt"
	"slices"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
)

// Changed blocks. A persistent store's entries are in commit order, and the
// create instant waits for every origin write in flight, each of which
// waited for the commit of its clusters' copies. So when snapshot S is
// created while snapshot (or bookmark) B holds n entries, B's entries
// 0 … n−1 are exactly the clusters (of B's size) written between B's create
// instant and S's. S's store records (B's UUID, n) as a base (basesNow), and
// the changed blocks between B and S are B's clusters whose entry number is
// below n (Snapshot.Changed), read from B's in-memory map: nothing per pair
// is kept in memory. On the origin, the clusters changed since S are S's
// copied bits (Engine.ChangedSince).
//
// Exact or absent: an answer is given only while both ends are live, valid
// and persistent, and B still holds at least n entries (a store that lost
// committed entries is invalid, so this is a second check); otherwise the
// call fails, and Bases leaves B out. Never a partial answer: a base that
// turns invalid or is cleared while an answer is computed fails the call.

// ChangedRun is one run of a changed-blocks answer: Length bytes, changed
// (possibly, at the base's granularity) or not since the base.
type ChangedRun struct {
	Length  int64
	Changed bool
}

// maxBases is how many bases a store records.
const maxBases = backstore.MaxBases

// maxChangedClusters bounds the clusters one Changed or ChangedSince call
// looks at; the caller asks again for the rest.
const maxChangedClusters = 1 << 16

// Base is a snapshot or bookmark that another snapshot, or the origin, can
// report changed blocks against.
type Base struct {
	Name        string
	UUID        string
	Granularity int // bytes: the base's cluster size
}

// basesNow lists, for a snapshot being created, every live persistent
// snapshot and bookmark with its committed entry count: the bases the new
// store records. Called with the gate held exclusively, so no origin write
// is in flight and every copy a write waited for is committed; a snapshot
// whose counts disagree anyway is left out rather than recorded wrong.
// Only the newest backstore.MaxBases are kept, by create instant (a
// reopen registers snapshots in the order it finds them).
func (e *Engine) basesNow() []storeBase {
	snaps := e.Snapshots()
	slices.SortStableFunc(snaps, func(a, b *Snapshot) int { return a.hdr.Created.Compare(b.hdr.Created) })
	var out []storeBase
	for _, s := range snaps {
		if !s.persistent {
			continue
		}
		ok := !s.inv.invalid.Load() && !s.commits.stopping.Load() && s.commits.idle()
		copied := s.cache.copiedCount()
		n := s.st.count()
		if !ok || int64(n) != copied {
			if ok {
				s.log.Warn("not recorded as a base: store and copied map disagree", "entries", n, "copied", copied)
			}
			continue
		}
		out = append(out, storeBase{UUID: s.hdr.UUID, Entries: n})
	}
	if len(out) > maxBases {
		out = out[len(out)-maxBases:]
	}
	return out
}

// baseOf finds the live snapshot that store uuid belongs to.
func (e *Engine) baseOf(uuid string) (*Snapshot, bool) {
	for _, b := range e.Snapshots() {
		if b.hdr.UUID == uuid {
			return b, true
		}
	}
	return nil, false
}

// exactBase reports whether b can answer for changes up to n entries.
// The caller holds b.life shared, so that b's store is not closed under it.
func (b *Snapshot) exactBase(n uint32) bool {
	return b.persistent && !b.inv.invalid.Load() && !b.closed.Load() && b.st.count() >= n
}

// liveBase is exactBase for a caller that does not hold b.life.
func (b *Snapshot) liveBase(n uint32) bool {
	b.life.RLock()
	defer b.life.RUnlock()
	return b.exactBase(n)
}

// tracks reports whether s can be the far end of a changed-blocks answer.
func (s *Snapshot) tracks() bool {
	return s.persistent && !s.inv.invalid.Load() && !s.closed.Load()
}

// Bases lists the snapshots and bookmarks that s can report changed blocks
// against now, oldest first: those live when s was created, still live,
// valid and persistent. A bookmark has none (it has no image).
func (s *Snapshot) Bases() []Base {
	if !s.tracks() || s.bookmark.Load() {
		return nil
	}
	var out []Base
	for _, rb := range s.hdr.Bases {
		if b, ok := s.e.baseOf(rb.UUID); ok && b.liveBase(rb.Entries) {
			out = append(out, Base{Name: b.name, UUID: b.hdr.UUID, Granularity: b.geo.csize})
		}
	}
	return out
}

// Changed describes which of bytes [off, off+length) of s's image differ
// from base's (a snapshot or bookmark named in Bases): runs covering the
// range from off in order, each changed or not at base's granularity. It
// may cover less than length (ask again from where it ended), never more.
// It fails, rather than answer, when base is not (or no longer) one of s's
// bases or either end turned invalid or was cleared meanwhile.
func (s *Snapshot) Changed(ctx context.Context, base string, off, length int64) ([]ChangedRun, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkSpan(s.geo.size, off, length); err != nil {
		return nil, err
	}
	b, n, err := s.base(base)
	if err != nil {
		return nil, err
	}
	// b.life held shared: b's map and store are not released under us
	// (stop takes it exclusively).
	b.life.RLock()
	defer b.life.RUnlock()
	if !b.exactBase(n) {
		return nil, fmt.Errorf("cow: %q cannot report changes since %q: %q is invalid or cleared: %w", s.name, base, base, ErrNoBase)
	}
	runs := changedRuns(b.geo, off, length, func(c uint32) bool {
		e, ok := b.st.entry(c)
		return ok && e < n
	})
	// Checked again after the answer was read: a base cleared or turned
	// invalid meanwhile may have answered from a closed or failed store.
	if !s.tracks() || !b.exactBase(n) {
		return nil, fmt.Errorf("cow: changes of %q since %q: a snapshot was cleared or turned invalid meanwhile: %w", s.name, base, ErrInvalid)
	}
	return runs, nil
}

// base finds base among s's recorded bases, with its entry count then.
func (s *Snapshot) base(name string) (*Snapshot, uint32, error) {
	if !s.tracks() || s.bookmark.Load() {
		return nil, 0, fmt.Errorf("cow: changes of %q since %q: %q has no live persistent image: %w", s.name, name, s.name, ErrInvalid)
	}
	b, ok := s.e.Snapshot(name)
	if !ok {
		return nil, 0, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	i := slices.IndexFunc(s.hdr.Bases, func(rb storeBase) bool { return rb.UUID == b.hdr.UUID })
	if i < 0 {
		return nil, 0, fmt.Errorf("cow: %q cannot report changes since %q: it was not a live persistent snapshot or bookmark when %q was created: %w",
			s.name, name, s.name, ErrNoBase)
	}
	n := s.hdr.Bases[i].Entries
	if !b.liveBase(n) {
		return nil, 0, fmt.Errorf("cow: %q cannot report changes since %q: %q is invalid: %w", s.name, name, name, ErrNoBase)
	}
	return b, n, nil
}

// ChangedSince describes which of bytes [off, off+length) of the origin
// may have been written since the create instant of snapshot or bookmark
// name, like Snapshot.Changed: a cluster counts from the moment its copy
// is taken, which is before the origin write. It fails for a transient or
// invalid snapshot.
func (e *Engine) ChangedSince(ctx context.Context, name string, off, length int64) ([]ChangedRun, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkSpan(e.size, off, length); err != nil {
		return nil, err
	}
	s, ok := e.Snapshot(name)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	// s.life held shared: stop releases the copied map under it exclusively.
	s.life.RLock()
	defer s.life.RUnlock()
	if !s.tracks() {
		return nil, fmt.Errorf("cow: changes since %q: it is transient, invalid or cleared: %w", name, ErrNoBase)
	}
	changed := s.cache.copied.get
	if rb := e.active(); rb != nil {
		// Clusters still to restore differ from s too. A restore copies
		// for s before it clears pending, hence pending is asked first.
		changed = func(c uint32) bool {
			return rb.pendingIn(s.geo.off(c), int64(s.geo.clusterLen(c))) || s.cache.copied.get(c)
		}
	}
	runs := changedRuns(s.geo, off, length, changed)
	if !s.tracks() {
		return nil, fmt.Errorf("cow: changes since %q: it was cleared or turned invalid meanwhile: %w", name, ErrInvalid)
	}
	return runs, nil
}

// Tracked lists the snapshots and bookmarks the origin can report changed
// blocks against (ChangedSince): the live, valid, persistent ones.
func (e *Engine) Tracked() []Base {
	var out []Base
	for _, s := range e.Snapshots() {
		if s.tracks() {
			out = append(out, Base{Name: s.name, UUID: s.hdr.UUID, Granularity: s.geo.csize})
		}
	}
	return out
}

// checkSpan is checkRange for a changed-blocks question, which needs at
// least one byte to answer about.
func checkSpan(size, off, length int64) error {
	if length == 0 {
		return fmt.Errorf("%w: empty range at offset %d", ErrRange, off)
	}
	return checkRange(size, off, length)
}

// changedRuns builds the runs of [off, off+length) from changed, a test of
// one cluster of geometry g, over at most maxChangedClusters clusters.
func changedRuns(g geometry, off, length int64, changed func(c uint32) bool) []ChangedRun {
	first, last := g.span(off, length)
	last = min(last, first+maxChangedClusters-1)
	end := min(off+length, g.off(last)+int64(g.clusterLen(last)))
	var runs []ChangedRun
	pos := off
	for c := first; ; c++ {
		ch := changed(c)
		cend := min(end, g.off(c)+int64(g.clusterLen(c)))
		if k := len(runs) - 1; k >= 0 && runs[k].Changed == ch {
			runs[k].Length += cend - pos
		} else {
			runs = append(runs, ChangedRun{Length: cend - pos, Changed: ch})
		}
		pos = cend
		if c == last {
			break
		}
	}
	return runs
}
