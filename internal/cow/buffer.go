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
		b.pool.p.Put(b)
	case n < 0:
		// A double release would hand a buffer in use to another copy
		// and silently corrupt a snapshot: stop here instead.
		panic("cow: cluster buffer released twice")
	}
}

// bufPool recycles cluster buffers of one size. Snapshots with the same
// cluster size share a pool (and so can share a buffer).
type bufPool struct {
	size int
	p    sync.Pool
}

func newBufPool(size int) *bufPool {
	bp := &bufPool{size: size}
	bp.p.New = func() any { return &clusterBuf{data: make([]byte, size), pool: bp} }
	return bp
}

// get returns a buffer holding refs references.
func (bp *bufPool) get(refs int) *clusterBuf {
	b := bp.p.Get().(*clusterBuf)
	b.refs.Store(int32(refs))
	return b
}
