package nbdsrv

import "sync"

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
