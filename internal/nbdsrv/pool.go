package nbdsrv

import (
	"math/bits"
	"sync"
)

// Buffers come from one sync.Pool per power-of-two size class, 4 KiB to
// 32 MiB, so that a request's payload costs no allocation once the pool is
// warm and a buffer is never more than twice the size asked for.
const (
	minClassShift = 12
	maxClassShift = 25
)

type bufPool struct {
	classes [maxClassShift - minClassShift + 1]sync.Pool
}

func newBufPool() *bufPool {
	p := &bufPool{}
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

// get returns a buffer of length n. Its contents are arbitrary.
func (p *bufPool) get(n int) *[]byte {
	c := classOf(n)
	if c >= len(p.classes) {
		b := make([]byte, n)
		return &b
	}
	b := p.classes[c].Get().(*[]byte)
	*b = (*b)[:n]
	return b
}

// put returns a buffer obtained from get.
func (p *bufPool) put(b *[]byte) {
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

// budget bounds what one connection has in flight: the number of requests
// admitted and not yet replied to, and the payload bytes they hold.
// Every request the reader admits (refused ones too) holds one slot from
// acquire until its reply has been sent or dropped, so replies waiting to be
// written are bounded by the same numbers.
type budget struct {
	mu       sync.Mutex
	cond     sync.Cond
	n, maxN  int
	bytes    int64
	maxBytes int64
	closed   bool
}

func newBudget(maxN int, maxBytes int64) *budget {
	b := &budget{maxN: maxN, maxBytes: maxBytes}
	b.cond.L = &b.mu
	return b
}

// acquire blocks until a slot and cost bytes are free (see fits). It
// returns false once the budget is closed.
func (b *budget) acquire(cost int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.closed && !b.fits(cost) {
		b.cond.Wait()
	}
	if b.closed {
		return false
	}
	b.n++
	b.bytes += cost
	return true
}

// tryAcquire is acquire without the wait: it reports false if the request
// does not fit now, or the budget is closed.
func (b *budget) tryAcquire(cost int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || !b.fits(cost) {
		return false
	}
	b.n++
	b.bytes += cost
	return true
}

// fits reports whether a request of cost bytes may be admitted now. A
// request larger than the whole byte budget is admitted alone, so no
// configuration deadlocks.
func (b *budget) fits(cost int64) bool {
	return b.n < b.maxN && (b.bytes == 0 || b.bytes+cost <= b.maxBytes)
}

func (b *budget) release(cost int64) {
	b.mu.Lock()
	b.n--
	b.bytes -= cost
	b.mu.Unlock()
	b.cond.Broadcast()
}

// close wakes every waiter for good: the connection is going away.
func (b *budget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}
