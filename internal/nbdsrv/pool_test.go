package nbdsrv

import (
	"context"
	"encoding/binary"
	"io"
	"runtime"
	"testing"
)

func TestBufPool(t *testing.T) {
	p := newBufPool()
	for _, n := range []int{1, 4096, 4097, 1 << 20, 32 << 20} {
		b := p.get(n)
		if len(*b) != n || cap(*b) < n || cap(*b) > max(2*n, 4096) {
			t.Errorf("get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		p.put(b)
	}
	if b := p.get(64 << 20); len(*b) != 64<<20 {
		t.Errorf("oversize get: %d", len(*b))
	}
	foreign := make([]byte, 5000)
	p.put(&foreign) // not a class size: dropped, not pooled
	if b := p.get(5000); cap(*b) != 8192 {
		t.Errorf("foreign buffer came back: cap %d", cap(*b))
	}
}

// nullBackend does no work, so that the test measures the server alone.
type nullBackend struct{}

func (nullBackend) ReadAt(ctx context.Context, p []byte, off int64) error { return nil }
func (nullBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return nil
}

// The hot path (read and write requests in a pipeline) allocates next to
// nothing per request once the pools are warm: buffers and request structs
// are pooled, the reply header lives in the request, header and data go
// out in one writev.
func TestHotPathAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("under the race detector sync.Pool drops items on purpose")
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 30, Backend: nullBackend{}})
	rc := dialRaw(t, ts.addr)
	rc.open("a", true)
	const depth, rounds = 16, 200
	req := make([]byte, 0, depth*(28+4096))
	payload := make([]byte, 4096)
	for i := 0; i < depth; i++ {
		cmd := CmdRead
		if i%2 == 1 {
			cmd = CmdWrite
		}
		h := make([]byte, 28)
		binary.BigEndian.PutUint32(h, magicRequest)
		binary.BigEndian.PutUint16(h[6:], uint16(cmd))
		binary.BigEndian.PutUint64(h[8:], uint64(i))
		binary.BigEndian.PutUint64(h[16:], uint64(i)*4096)
		binary.BigEndian.PutUint32(h[24:], 4096)
		req = append(req, h...)
		if cmd == CmdWrite {
			req = append(req, payload...)
		}
	}
	// Replies: 8 reads (20+8+4096; the data is zero so a 32-byte hole)
	// and 8 writes (20) per round.
	replyBytes := depth/2*(20+12) + depth/2*20
	buf := make([]byte, replyBytes)
	round := func() {
		if _, err := rc.c.Write(req); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(rc.br, buf); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 20; i++ {
		round()
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < rounds; i++ {
		round()
	}
	runtime.ReadMemStats(&after)
	perReq := float64(after.Mallocs-before.Mallocs) / (depth * rounds)
	bytesPerReq := float64(after.TotalAlloc-before.TotalAlloc) / (depth * rounds)
	t.Logf("%.2f allocations, %.0f bytes per request", perReq, bytesPerReq)
	// A 4 KiB buffer per request would be 4096 bytes; what remains is the
	// goroutine start and the per-batch writev slice.
	if bytesPerReq > 512 {
		t.Errorf("%.0f bytes allocated per request: buffers are not pooled", bytesPerReq)
	}
}
