// Package bytepool recycles byte buffers of variable size: request
// payloads in the NBD server, held origin writes in the copy-on-write engine.
package bytepool

import (
	"math/bits"
	"sync"
)

// Buffers come from one sync.Pool per power-of-two size class, 4 KiB to
// 32 MiB, so that a payload costs no allocation once the pool is warm and a
// buffer is never more than twice the size asked for.
const (
	minClassShift = 12
	maxClassShift = 25
)

// Pool is a set of size classes. The zero value is not usable: call New.
type Pool struct {
	classes [maxClassShift - minClassShift + 1]sync.Pool
}

// New returns an empty pool.
func New() *Pool {
	p := &Pool{}
	for i := range p.classes {
		size := 1 << (minClassShift + i)
		p.classes[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
	return p
}

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// Get returns a buffer of length n. Its contents are arbitrary. A buffer
// larger than the largest class is allocated, and not pooled by Put.
func (p *Pool) Get(n int) *[]byte {
	c := classOf(n)
	if c >= len(p.classes) {
		b := make([]byte, n)
		return &b
	}
	b := p.classes[c].Get().(*[]byte)
	*b = (*b)[:n]
	return b
}

// Put returns a buffer obtained from Get; nil is ignored.
func (p *Pool) Put(b *[]byte) {
	if b == nil {
		return
	}
	c := classOf(cap(*b))
	if c >= len(p.classes) || cap(*b) != 1<<(minClassShift+c) {
		return // not one of ours: let the GC have it
	}
	*b = (*b)[:cap(*b)]
	p.classes[c].Put(b)
}
