package cow

import (
	"sync"
	"sync/atomic"
)

// clusterBuf holds the old contents of one cluster, read once from the
// origin and shared by every snapshot that needed it. It is immutable from
// the moment it is published until the last reference is dropped; then it
// goes back to its pool.
type clusterBuf struct {
	data []byte
	refs atomic.Int32
	pool *bufPool
}

// release drops one reference.
func (b *clusterBuf) release() {
	switch n := b.refs.Add(-1); {
	case n == 0:
		b.pool.put(b)
	case n < 0:
		// A double release would hand a buffer in use to another copy
		// and silently corrupt a snapshot: stop here instead.
		panic("cow: cluster buffer released twice")
	}
}

// bufPool recycles cluster buffers of one size. Snapshots with the same
// cluster size share a pool (and so can share a buffer). It keeps at most
// as many idle buffers as those snapshots have cache slots: no more can be
// in use at once by the caches, and unlike a sync.Pool it does not drop
// them at every garbage collection, which would turn first writes into
// cluster-sized allocations.
type bufPool struct {
	size int

	mu   sync.Mutex
	idle []*clusterBuf
	max  int // idle buffers kept: the cache slots of the snapshots using the pool
}

func newBufPool(size int) *bufPool { return &bufPool{size: size} }

// get returns a buffer holding refs references.
func (bp *bufPool) get(refs int) *clusterBuf {
	bp.mu.Lock()
	var b *clusterBuf
	if n := len(bp.idle); n > 0 {
		b = bp.idle[n-1]
		bp.idle[n-1] = nil
		bp.idle = bp.idle[:n-1]
	}
	bp.mu.Unlock()
	if b == nil {
		b = &clusterBuf{data: make([]byte, bp.size), pool: bp}
	}
	b.refs.Store(int32(refs))
	return b
}

func (bp *bufPool) put(b *clusterBuf) {
	bp.mu.Lock()
	if len(bp.idle) < bp.max {
		bp.idle = append(bp.idle, b)
	}
	bp.mu.Unlock()
}

// reserve adjusts how many idle buffers the pool keeps (a snapshot's slots
// when it starts, minus them when it stops).
func (bp *bufPool) reserve(slots int) {
	bp.mu.Lock()
	bp.max += slots
	if len(bp.idle) > bp.max {
		clear(bp.idle[bp.max:])
		bp.idle = bp.idle[:bp.max]
	}
	bp.mu.Unlock()
}
