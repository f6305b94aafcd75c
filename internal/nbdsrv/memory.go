package nbdsrv

import (
	"context"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// memory bounds the payload bytes that every connection together holds
// (Config.MaxBytes): WRITE payloads from the moment the reader takes them
// in until the backend wrote them, READ and BLOCK_STATUS replies from the
// backend's answer until they are on the socket. A connection's reader
// takes its request's cost here after the connection's own budget, and
// waits when it does not fit, so the connection stops reading: the
// client's requests stay in the socket, not in our memory.
//
// What a client can pin without reading its replies is what its admitted
// requests cost, and a READ costs at most readChunk however long it is
// (streamRead), so the bytes pinned by clients that do not read are bounded
// by their requests in flight, not by the lengths they ask for.
//
// Waiters are served in arrival order, so a large request is not starved
// by a stream of small ones, and every connection waiting gets its turn as
// memory frees: a well-behaved client is slowed by a flood of writes on
// other connections, never shut out.
type memory struct {
	max int64
	// used and peak (the highest use since the last trim) change without
	// the mutex on the fast path: a request that fits while nobody waits,
	// and a release while nobody waits, cost an atomic operation or two,
	// not a lock every connection's requests would share.
	used, peak atomic.Int64
	// waiting is len(waiters), readable without the mutex. A waiter adds
	// itself (and counts itself here) before it checks whether it fits,
	// and a release lowers used before it reads waiting: so either the
	// waiter sees the bytes freed, or the release sees the waiter and
	// grants under the mutex. No wake-up is lost.
	waiting atomic.Int32

	mu      sync.Mutex
	waiters []*memWaiter
	trimmer *time.Timer // pending trim, or nil
}

type memWaiter struct {
	n     int64
	ready chan struct{} // closed when the bytes were granted
}

// After a burst that used more than trimAfterPeak, once use has fallen
// under trimBelow and stayed there for trimDelay, the memory is given back
// to the OS: the buffer pools (sync.Pool) hold on to their buffers until
// two garbage collections pass, and an idle daemon may not collect for two
// minutes, nor does the runtime return freed pages at once.
const (
	trimAfterPeak = 64 << 20
	trimBelow     = 16 << 20
	trimDelay     = time.Second
)

func newMemory(max int64) *memory { return &memory{max: max} }

// take grants n bytes if they fit now: a request larger than the whole
// budget is granted alone, so no configuration deadlocks.
func (m *memory) take(n int64) bool {
	for {
		u := m.used.Load()
		if u != 0 && u+n > m.max {
			return false
		}
		if m.used.CompareAndSwap(u, u+n) {
			if p := m.peak.Load(); u+n > p {
				m.peak.CompareAndSwap(p, u+n) // a lost race lowers it a little; it is a hint
			}
			return true
		}
	}
}

// tryAcquire grants n bytes if they fit now and nobody waits in line.
func (m *memory) tryAcquire(n int64) bool {
	return m.waiting.Load() == 0 && m.take(n)
}

// acquire grants n bytes, waiting in line until they fit. It reports false
// if ctx ended first (the connection died); nothing is held then.
func (m *memory) acquire(ctx context.Context, n int64) bool {
	if m.tryAcquire(n) {
		return true
	}
	w := &memWaiter{n: n, ready: make(chan struct{})}
	m.mu.Lock()
	m.waiters = append(m.waiters, w)
	m.waiting.Add(1)
	m.grantLocked() // w may fit already, or be behind others that do
	m.mu.Unlock()
	select {
	case <-w.ready:
		return true
	case <-ctx.Done():
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-w.ready: // granted meanwhile: give it back
		m.used.Add(-n)
	default:
		for i, x := range m.waiters {
			if x == w {
				m.waiters = append(m.waiters[:i], m.waiters[i+1:]...)
				m.waiting.Add(-1)
				break
			}
		}
	}
	m.grantLocked() // the next in line may fit now
	return false
}

// release returns n bytes and grants them to those waiting, in order.
func (m *memory) release(n int64) {
	if n == 0 {
		return
	}
	u := m.used.Add(-n)
	trim := u < trimBelow && m.peak.Load() > trimAfterPeak
	if m.waiting.Load() == 0 && !trim {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.grantLocked()
	if trim && m.trimmer == nil {
		m.trimmer = time.AfterFunc(trimDelay, m.trim)
	}
}

func (m *memory) grantLocked() {
	for len(m.waiters) > 0 && m.take(m.waiters[0].n) {
		w := m.waiters[0]
		m.waiters[0] = nil
		m.waiters = m.waiters[1:]
		m.waiting.Add(-1)
		close(w.ready)
	}
}

// trim returns freed memory to the OS if use is still low. Two collections
// empty the pools (the first moves their buffers to the victim cache, the
// second drops them); FreeOSMemory's own collection is the second, and it
// then returns the freed pages at once.
func (m *memory) trim() {
	m.mu.Lock()
	m.trimmer = nil
	quiet := m.used.Load() < trimBelow
	if quiet {
		m.peak.Store(m.used.Load())
	}
	m.mu.Unlock()
	if quiet {
		runtime.GC()
		debug.FreeOSMemory()
	}
}
