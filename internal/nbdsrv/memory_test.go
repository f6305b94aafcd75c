package nbdsrv

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestMemoryGrantsInOrder(t *testing.T) {
	m := newMemory(100)
	if !m.tryAcquire(80) {
		t.Fatal("80 of 100 refused")
	}
	// 50 does not fit; 10 would, but must not pass the one waiting.
	order := make(chan int64, 2)
	acquire := func(n int64) {
		if !m.acquire(context.Background(), n) {
			t.Errorf("acquire %d failed", n)
		}
		order <- n
	}
	go acquire(50)
	waitFor(t, func() bool { m.mu.Lock(); defer m.mu.Unlock(); return len(m.waiters) == 1 })
	if m.tryAcquire(10) {
		t.Fatal("tryAcquire passed a waiter")
	}
	go acquire(10)
	waitFor(t, func() bool { m.mu.Lock(); defer m.mu.Unlock(); return len(m.waiters) == 2 })
	time.Sleep(10 * time.Millisecond)
	if len(order) != 0 {
		t.Fatal("a waiter was granted with 20 of 100 free and 50 waiting first")
	}
	m.release(80)
	<-order
	<-order
	if m.used.Load() != 60 {
		t.Fatalf("used %d after both grants, want 60", m.used.Load())
	}
	m.release(60)
	// More than the whole budget is granted alone.
	if !m.tryAcquire(500) {
		t.Fatal("a request over the budget was refused with nothing held")
	}
	if m.tryAcquire(1) {
		t.Fatal("granted beside a request over the budget")
	}
	m.release(500)
	if m.used.Load() != 0 || len(m.waiters) != 0 {
		t.Fatalf("used %d, %d waiters at the end", m.used.Load(), len(m.waiters))
	}
}

func TestMemoryWaiterCancelled(t *testing.T) {
	m := newMemory(100)
	m.tryAcquire(60)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan bool)
	go func() { done <- m.acquire(ctx, 70) }()
	waitFor(t, func() bool { m.mu.Lock(); defer m.mu.Unlock(); return len(m.waiters) == 1 })
	got := make(chan bool)
	go func() { got <- m.acquire(context.Background(), 30) }() // behind the 70
	waitFor(t, func() bool { m.mu.Lock(); defer m.mu.Unlock(); return len(m.waiters) == 2 })
	cancel()
	if <-done {
		t.Fatal("a cancelled waiter was granted")
	}
	// Leaving the head of the line lets the next one in.
	select {
	case ok := <-got:
		if !ok {
			t.Fatal("the waiter behind a cancelled one failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter behind a cancelled one was not granted")
	}
	if m.used.Load() != 90 {
		t.Fatalf("used %d, want 90", m.used.Load())
	}
}

// All connections together hold at most Config.MaxBytes of payloads: with
// writes stuck in the backend, a second connection's write waits for the
// first's to finish.
func TestMemorySharedByConnections(t *testing.T) {
	const size, n = 8 << 20, 3 << 20
	m := newMem(size)
	var inBackend, most atomic.Int64
	release := make(chan struct{})
	m.setHook(func(ctx context.Context, op string, off, length int64) error {
		if op != "write" {
			return nil
		}
		cur := inBackend.Add(length)
		for {
			old := most.Load()
			if cur <= old || most.CompareAndSwap(old, cur) {
				break
			}
		}
		defer inBackend.Add(-length)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	ts := startServer(t, Config{MaxBytes: 4 << 20}, Export{Name: "a", Size: size, Backend: m})
	a, b := dialRaw(t, ts.addr), dialRaw(t, ts.addr)
	a.open("a", false)
	b.open("a", false)
	a.request(CmdWrite, 0, 1, 0, n, pattern(n, 1))
	waitFor(t, func() bool { return inBackend.Load() == n })
	// b's reader waits for memory and stops reading, so the payload
	// stays in the socket: the client's write blocks until then.
	sent := make(chan struct{})
	go func() { defer close(sent); b.request(CmdWrite, 0, 2, n, n, pattern(n, 2)) }()
	time.Sleep(100 * time.Millisecond)
	if got := inBackend.Load(); got != n {
		t.Fatalf("%d bytes in the backend with a 4 MiB budget, want %d", got, n)
	}
	close(release)
	<-sent
	for _, rc := range []*rawClient{a, b} {
		if e, _, _ := rc.simple(0); e != 0 {
			t.Fatalf("write: %v", e)
		}
	}
	if most.Load() != n {
		t.Fatalf("at most %d bytes in the backend at once, want %d", most.Load(), n)
	}
	if !bytes.Equal(m.bytesAt(n, n), pattern(n, 2)) {
		t.Fatal("the second write's data is not in the backend")
	}
}

// A READ longer than readChunk is read and sent a piece at a time: the data
// arrives whole, in one OFFSET_DATA chunk for structured replies, and a
// reply queued behind it is not cut into it.
func TestStreamedRead(t *testing.T) {
	const size = 3*readChunk + 4096
	for _, structured := range []bool{false, true} {
		m := newMem(size)
		copy(m.data, pattern(size, 9))
		var reads atomic.Int64
		m.setHook(func(ctx context.Context, op string, off, length int64) error {
			if op == "read" {
				reads.Add(1)
				if length > readChunk {
					return errors.New("a read longer than readChunk reached the backend")
				}
			}
			return nil
		})
		ts := startServer(t, Config{}, Export{Name: "a", Size: size, Backend: m})
		rc := dialRaw(t, ts.addr)
		rc.open("a", structured)
		const off, n = 1000, 2*readChunk + 17
		flags := CmdFlags(0)
		if structured {
			flags = FlagDF
		}
		rc.request(CmdRead, flags, 1, off, n, nil)
		rc.request(CmdRead, 0, 2, 0, 4096, nil)
		got := map[uint64][]byte{}
		for len(got) < 2 {
			if !structured {
				// Replies come in completion order: the short one may
				// come first; its length tells them apart.
				h := rc.read(16)
				if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
					t.Fatalf("simple: errno %d", e)
				}
				cookie := binary.BigEndian.Uint64(h[8:])
				got[cookie] = rc.read(map[uint64]int{1: n, 2: 4096}[cookie])
				continue
			}
			c := rc.chunk()
			switch {
			case c.typ == ReplyOffsetData:
				got[c.cookie] = append(got[c.cookie], c.payload[8:]...)
				if c.cookie == 1 && c.flags&replyFlagDone != 0 {
					t.Fatal("structured: the data chunk of a streamed read is marked done")
				}
			case c.typ == ReplyNone && c.cookie == 1 && c.flags&replyFlagDone != 0:
			default:
				t.Fatalf("structured: chunk %v flags %#x cookie %d", c.typ, c.flags, c.cookie)
			}
		}
		if !bytes.Equal(got[1], m.bytesAt(off, n)) || !bytes.Equal(got[2], m.bytesAt(0, 4096)) {
			t.Fatalf("structured %v: data differs", structured)
		}
		if r := reads.Load(); r != 4 {
			t.Errorf("structured %v: %d backend reads, want 3 pieces and the short read", structured, r)
		}
	}
}

// A streamed read whose first piece fails is an ordinary error reply; one
// whose later piece fails closes the connection (the reply's header has
// gone out), and says why in the log.
func TestStreamedReadFails(t *testing.T) {
	const size = 3 * readChunk
	for _, structured := range []bool{false, true} {
		m := newMem(size)
		m.setHook(func(ctx context.Context, op string, off, length int64) error {
			if op == "read" && off >= 2*readChunk {
				return syscall.EIO
			}
			return nil
		})
		ts := startServer(t, Config{}, Export{Name: "a", Size: size, Backend: m})
		rc := dialRaw(t, ts.addr)
		rc.open("a", structured)
		rc.request(CmdRead, 0, 1, 2*readChunk, readChunk, nil)
		if structured {
			if e, _ := chunkErrno(t, rc.chunk()); e != EIO {
				t.Fatalf("first piece failed: %v", e)
			}
		} else if e, _, _ := rc.simple(0); e != EIO {
			t.Fatalf("first piece failed: %v", e)
		}
		// Still open; now a read whose second piece fails: the client
		// gets the header and the first piece, then the end of the stream.
		rc.request(CmdRead, 0, 2, readChunk, 2*readChunk, nil)
		if structured {
			h := rc.read(20)
			if typ, l := ReplyType(binary.BigEndian.Uint16(h[6:])), binary.BigEndian.Uint32(h[16:]); typ != ReplyOffsetData || l != 8+2*readChunk {
				t.Fatalf("structured: chunk %v of %d bytes, want OFFSET_DATA of the whole read", typ, l)
			}
			rc.read(8 + readChunk)
		} else {
			if e, _, _ := rc.simple(0); e != 0 {
				t.Fatalf("simple: errno %v before any data", e)
			}
			rc.read(readChunk)
		}
		rc.expectClosed()
		if !contains(ts.logs.String(), "bytes of the reply were sent") {
			t.Errorf("structured %v: the log does not say why the connection was closed:\n%s", structured, ts.logs.String())
		}
	}
}

// The memory a burst used goes back to the OS once it is over (trim);
// here, that the trim is scheduled and runs once use is low.
func TestMemoryTrimAfterBurst(t *testing.T) {
	m := newMemory(1 << 30)
	m.tryAcquire(trimAfterPeak + 1)
	m.release(trimAfterPeak + 1)
	m.mu.Lock()
	scheduled := m.trimmer != nil
	m.mu.Unlock()
	if !scheduled {
		t.Fatal("no trim scheduled after a burst")
	}
	waitFor(t, func() bool { m.mu.Lock(); defer m.mu.Unlock(); return m.trimmer == nil })
	if m.peak.Load() != 0 {
		t.Fatalf("peak %d after the trim, want 0", m.peak.Load())
	}
}
