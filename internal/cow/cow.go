package cow

import (
	"fmt"
	"math"
	"slices"
)

// snapSet is the immutable set of snapshots that copy-on-write serves,
// grouped by cluster size: within a group one origin read of a cluster
// serves every snapshot that needs it. It is replaced (never modified) with
// the engine's gate held exclusively.
type snapSet struct {
	groups []group
}

type group struct {
	geo   geometry
	pool  *bufPool
	snaps []*Snapshot // by id: the order in which requests reserve slots
}

func (ss *snapSet) with(s *Snapshot) *snapSet {
	out := &snapSet{}
	found := false
	for _, g := range ss.groups {
		g.snaps = slices.Clone(g.snaps)
		if g.geo.csize == s.geo.csize {
			g.snaps = append(g.snaps, s)
			found = true
		}
		out.groups = append(out.groups, g)
	}
	if !found {
		out.groups = append(out.groups, group{geo: s.geo, pool: s.pool, snaps: []*Snapshot{s}})
	}
	return out
}

func (ss *snapSet) without(s *Snapshot) *snapSet {
	out := &snapSet{}
	for _, g := range ss.groups {
		g.snaps = slices.DeleteFunc(slices.Clone(g.snaps), func(x *Snapshot) bool { return x == s })
		if len(g.snaps) > 0 {
			out.groups = append(out.groups, g)
		}
	}
	return out
}

func sortSnapshots(s []*Snapshot) {
	slices.SortFunc(s, func(a, b *Snapshot) int {
		switch {
		case a.id < b.id:
			return -1
		case a.id > b.id:
			return 1
		}
		return 0
	})
}

// cowReq is the scratch state of one origin-modifying request.
type cowReq struct {
	reserved []reservation
	tickets  []ticket
}

// reservation: a BUSY slot this request holds in snapshot s.
type reservation struct {
	s  *Snapshot
	sl *slot
}

// ticket: before touching the origin, this request waits until s has
// committed sequence number seq (persistent mode only).
type ticket struct {
	s   *Snapshot
	seq uint64
}

func (r *cowReq) addTicket(s *Snapshot, seq uint64) {
	for i := range r.tickets {
		if r.tickets[i].s == s {
			r.tickets[i].seq = max(r.tickets[i].seq, seq)
			return
		}
	}
	r.tickets = append(r.tickets, ticket{s, seq})
}

// wait blocks until every ticket is durable (or its snapshot failed).
func (r *cowReq) wait() {
	for _, t := range r.tickets {
		t.s.commits.waitDurable(t.seq)
	}
}

func (r *cowReq) reset() {
	clear(r.reserved)
	r.reserved = r.reserved[:0]
	clear(r.tickets)
	r.tickets = r.tickets[:0]
}

// copyOnWrite is fss_copy_on_write: for every cluster of [off, off+n) that
// some snapshot still needs, copy it before the caller modifies the origin.
// Waits for durability are collected in r and done by the caller, so that
// one request's clusters (and concurrent requests) share commits.
func (e *Engine) copyOnWrite(r *cowReq, set *snapSet, off, n int64) {
	for gi := range set.groups {
		g := &set.groups[gi]
		for _, s := range g.snaps {
			if !s.inv.invalid.Load() {
				s.stats.cowCalls.Add(1)
			}
		}
		first, last := g.geo.span(off, n)
		for c := first; ; c++ {
			e.copyCluster(r, g, c)
			if c == last {
				break
			}
		}
	}
}

// copyCluster is fss_read_cluster generalised to several snapshots: cluster
// c is read from the origin at most once and the buffer is handed to every
// snapshot of the group that needs it.
//
// Deadlock freedom: a request holds BUSY slots of one cluster only, and
// reserves them in snapshot id order; a request waiting in snapshot j
// (cowwait2 or cowwait3) holds reservations only in snapshots before j, and
// the slots it waits for are released by a commit (the writer, woken before
// a cowwait3, needs nothing from requests) or by a request that itself only
// waits further along the order. So the wait-for graph has no cycle. Commit
// waits (tickets) come after all reservations are released.
func (e *Engine) copyCluster(r *cowReq, g *group, c uint32) {
	for _, s := range g.snaps {
		if s.settled(c) {
			continue
		}
		sl, seq, res := s.cache.reserve(c)
		switch res {
		case reserved:
			r.reserved = append(r.reserved, reservation{s, sl})
		case alreadyCopied:
			// Copied by an earlier request. In persistent mode the copy
			// may still be on its way to the store: the origin must wait
			// for it just as the first writer does.
			if s.persistent && seq > s.commits.durableSeq.Load() {
				r.addTicket(s, seq)
			}
		case refusedNow:
			if s.persistent && s.inv.invalid.Load() && !s.inv.released.Load() {
				// Not before the invalidation is recorded.
				r.addTicket(s, math.MaxUint64)
			}
		}
	}
	if len(r.reserved) == 0 {
		return
	}

	buf := g.pool.get(len(r.reserved))
	n := g.geo.clusterLen(c)
	// Bookmarks record that the cluster was written, not its contents:
	// if only bookmarks need it, the origin is not read.
	var err error
	if slices.ContainsFunc(r.reserved, func(rv reservation) bool { return !rv.s.bookmark.Load() }) {
		err = readFull(e.origin, buf.data[:n], g.geo.off(c))
	}
	clear(buf.data[n:])
	for _, rv := range r.reserved {
		s := rv.s
		if err != nil {
			s.fail(fmt.Sprintf("read origin cluster %d: %v", c, err))
		}
		// The copy is complete: publish makes it VALID and sets the
		// copied bit before this request (or any other) may modify the
		// origin; snapshot reads rely on it.
		seq, ok := s.cache.publish(rv.sl, buf)
		if !ok {
			if s.persistent && s.inv.invalid.Load() {
				r.addTicket(s, math.MaxUint64)
			}
			buf.release()
			continue
		}
		s.stats.clustersCopied.Add(1)
		if !s.bookmark.Load() {
			s.stats.bytesCopied.Add(int64(n))
		}
		if s.persistent {
			// This request commits the cluster itself, or finds it in
			// a commit in progress (waitDurable).
			r.addTicket(s, seq)
		}
	}
	clear(r.reserved)
	r.reserved = r.reserved[:0]
}
