package nbdsrv

import (
	"context"
	"runtime"
	"runtime/debug"
	"sync"
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
	mu      sync.Mutex
	max     int64
	used    int64
	peak    int64 // highest use since the last trim
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

// fits reports whether n more bytes may be granted now. A request larger
// than the whole budget is granted alone, so no configuration deadlocks.
func (m *memory) fits(n int64) bool { return m.used == 0 || m.used+n <= m.max }

func (m *memory) take(n int64) {
	m.used += n
	m.peak = max(m.peak, m.used)
}

// tryAcquire grants n bytes if they fit now and nobody waits before.
func (m *memory) tryAcquire(n int64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.waiters) > 0 || !m.fits(n) {
		return false
	}
	m.take(n)
	return true
}

// acquire grants n bytes, waiting in line until they fit. It reports false
// if ctx ended first (the connection died); nothing is held then.
func (m *memory) acquire(ctx context.Context, n int64) bool {
	if m.tryAcquire(n) {
		return true
	}
	m.mu.Lock()
	if len(m.waiters) == 0 && m.fits(n) {
		m.take(n)
		m.mu.Unlock()
		return true
	}
	w := &memWaiter{n: n, ready: make(chan struct{})}
	m.waiters = append(m.waiters, w)
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
		m.used -= n
	default:
		for i, x := range m.waiters {
			if x == w {
				m.waiters = append(m.waiters[:i], m.waiters[i+1:]...)
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
	m.mu.Lock()
	defer m.mu.Unlock()
	m.used -= n
	m.grantLocked()
	if m.used < trimBelow && m.peak > trimAfterPeak && m.trimmer == nil {
		m.trimmer = time.AfterFunc(trimDelay, m.trim)
	}
}

func (m *memory) grantLocked() {
	for len(m.waiters) > 0 && m.fits(m.waiters[0].n) {
		w := m.waiters[0]
		m.waiters[0] = nil
		m.waiters = m.waiters[1:]
		m.take(w.n)
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
	quiet := m.used < trimBelow
	if quiet {
		m.peak = m.used
	}
	m.mu.Unlock()
	if quiet {
		runtime.GC()
		debug.FreeOSMemory()
	}
}
