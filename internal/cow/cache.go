package cow

import "sync"

// slotState is a cache slot's state (fss: FSS_CACHE_FREE / BUSY / VALID).
type slotState uint8

const (
	slotFree  slotState = iota
	slotBusy            // reserved; the origin read is in progress
	slotValid           // holds the old data until its commit returned
)

// slot is one cache slot. Its fields are guarded by the cache's mu; seq is
// assigned by the committer (enqueue) with that mu held too. Once VALID, a
// slot's cluster, seq and buf do not change until the committer drops it,
// so the committer reads them without the cache's mu.
type slot struct {
	cluster uint32
	state   slotState
	seq     uint64 // publication number, for commit waits
	buf     *clusterBuf
}

// cache is a snapshot's RAM cache of old cluster contents (fss sc_cache),
// with the copied bitmap (sc_copied).
//
// Publication: a slot becomes VALID, and its cluster's copied bit is set,
// only once its buffer holds the cluster's old data complete and the
// committer has given it a publication number and queued it (enqueue, with
// mu held); the bit is never cleared. A request modifies the origin only
// after that, so a snapshot read that finds the bit clear after reading the
// origin read frozen bytes (Snapshot.ReadAt).
//
// Release: a VALID slot is freed, and its cluster leaves cached, only by the
// committer after the commit that wrote it returned (or when the snapshot
// failed or is cleared), so a read that misses the cache finds the cluster
// in the store.
//
// Lock order: mu, then the committer's mu (enqueue, full); the committer
// never takes mu while holding its own.
type cache struct {
	nslots int
	// copied is loaded without mu; bits are set under it.
	copied bitmap

	// Set at construction: refused reports that the snapshot failed or
	// is stopping, so requests give up on it; full counts a wait for a
	// free slot and tells the committer; enqueue is committer.enqueue.
	refused func() bool
	full    func()
	enqueue func(*slot) uint64

	mu      sync.Mutex
	cond    sync.Cond // a slot was freed or a BUSY cluster resolved (cowwait2, cowwait3)
	slots   []slot
	free    []*slot
	cached  map[uint32]*slot // clusters in BUSY or VALID slots
	copiedN int64
}

func (k *cache) init(nslots int, clusters uint32) {
	k.nslots = nslots
	k.copied = newBitmap(clusters)
	k.slots = make([]slot, nslots)
	k.free = make([]*slot, nslots)
	k.cached = make(map[uint32]*slot, nslots)
	for i := range k.slots {
		k.free[i] = &k.slots[i]
	}
	k.cond.L = &k.mu
}

// reserveResult is what reserve did for a cluster.
type reserveResult uint8

const (
	reserved      reserveResult = iota // the slot is BUSY for the caller
	alreadyCopied                      // seq is the copy's publication number, 0 if it left the cache
	refusedNow                         // the snapshot failed or is stopping
)

// reserve takes a free slot for cluster c unless c is copied already or
// the snapshot refuses requests, waiting while another request reads c
// (cowwait2) or the cache is full (cowwait3: backpressure).
func (k *cache) reserve(c uint32) (*slot, uint64, reserveResult) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for {
		if k.refused() {
			return nil, 0, refusedNow
		}
		sl := k.cached[c]
		if k.copied.get(c) {
			if sl != nil {
				return nil, sl.seq, alreadyCopied
			}
			return nil, 0, alreadyCopied
		}
		if sl != nil {
			k.cond.Wait() // cowwait2: another request is reading c
			continue
		}
		if len(k.free) == 0 {
			// cowwait3: the committer frees slots as it commits. In
			// persistent mode nobody else may be about to commit (a
			// request larger than the cache waits here before waiting
			// for its tickets): tell the committer.
			k.full()
			k.cond.Wait()
			continue
		}
		sl = k.free[len(k.free)-1]
		k.free = k.free[:len(k.free)-1]
		sl.cluster, sl.state = c, slotBusy
		k.cached[c] = sl
		return sl, 0, reserved
	}
}

// publish makes the reserved slot sl VALID with buf, the cluster's old data
// complete, and returns its publication number (see Publication above); the
// slot takes over the caller's reference to buf. If the snapshot refuses
// requests by now, sl is freed instead and publish reports false: the
// caller keeps its reference.
func (k *cache) publish(sl *slot, buf *clusterBuf) (uint64, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	defer k.cond.Broadcast()
	if k.refused() {
		delete(k.cached, sl.cluster)
		sl.state = slotFree
		k.free = append(k.free, sl)
		return 0, false
	}
	sl.buf, sl.state = buf, slotValid
	seq := k.enqueue(sl)
	if k.copied.set(sl.cluster) {
		k.copiedN++
	}
	return seq, true
}

// lookup returns a reference to cluster c's cached old data, or nil.
func (k *cache) lookup(c uint32) *clusterBuf {
	k.mu.Lock()
	defer k.mu.Unlock()
	if sl := k.cached[c]; sl != nil && sl.state == slotValid {
		sl.buf.refs.Add(1)
		return sl.buf
	}
	return nil
}

// drop frees VALID slots whose commit returned (or that the committer
// abandons) and clears batch.
func (k *cache) drop(batch []*slot) {
	k.mu.Lock()
	for _, sl := range batch {
		delete(k.cached, sl.cluster)
		sl.buf.release()
		sl.buf, sl.state = nil, slotFree
		k.free = append(k.free, sl)
	}
	k.cond.Broadcast()
	k.mu.Unlock()
	clear(batch)
}

// markCopied sets c's copied bit for a cluster the store already holds
// (Reopen).
func (k *cache) markCopied(c uint32) {
	k.mu.Lock()
	if k.copied.set(c) {
		k.copiedN++
	}
	k.mu.Unlock()
}

// copiedCount is the number of clusters copied.
func (k *cache) copiedCount() int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.copiedN
}

// wake wakes requests waiting in reserve, after refused turned true.
func (k *cache) wake() {
	k.mu.Lock()
	k.cond.Broadcast()
	k.mu.Unlock()
}

// release drops the cache's memory once no request can reach it.
func (k *cache) release() {
	k.mu.Lock()
	k.copied, k.slots, k.free, k.cached = nil, nil, nil, nil
	k.mu.Unlock()
}
