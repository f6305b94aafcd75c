package nbdsrv

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

var burstSeed = flag.Uint64("burst-seed", 0, "TestPipelinedBursts: replay this seed (0: a new one)")

// The moving average moves to workers only after several slow requests in a
// row, not on one outlier, and back once the backend is fast again.
func TestServiceTime(t *testing.T) {
	fast, slow, stall := 3*time.Microsecond, time.Millisecond, 10*time.Second
	tests := []struct {
		name    string
		samples []time.Duration
		want    bool // fast()
	}{
		{"fresh", nil, true},
		{"fast backend", []time.Duration{fast, fast, fast, fast}, true},
		{"one stall among fast ones", []time.Duration{fast, fast, stall, fast}, true},
		{"two slow in a row", []time.Duration{fast, fast, slow, slow}, true},
		{"slow backend", []time.Duration{slow, slow, slow, slow, slow, slow, slow}, false},
		{"slow then fast again", append(repeat(slow, 20), repeat(fast, 20)...), true},
		{"slow, a few fast", append(repeat(slow, 20), repeat(fast, 2)...), false},
	}
	for _, tt := range tests {
		var s serviceTime
		for _, d := range tt.samples {
			s.observe(d)
		}
		if got := s.fast(); got != tt.want {
			t.Errorf("%s: fast() = %v (average %v), want %v", tt.name, got, time.Duration(s.ns.Load()), tt.want)
		}
	}
}

func repeat(d time.Duration, n int) []time.Duration {
	s := make([]time.Duration, n)
	for i := range s {
		s[i] = d
	}
	return s
}

// TestPipelinedBursts sends bursts of requests without waiting for replies:
// writes of every size (some run on the reader, some on workers), refused
// requests, and a backend that turns slow for a while and sometimes stalls
// a request past the watchdog, so that the reader switches between running
// requests itself and handing them out, is taken over, and grows its read
// buffer. Every request gets exactly one reply with the right outcome, and
// the data read back equals what was written.
func TestPipelinedBursts(t *testing.T) {
	seed := *burstSeed
	if seed == 0 {
		seed = rand.Uint64()
	}
	t.Logf("seed %d (replay: -burst-seed %d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	const size = 8 << 20
	m := newMem(size)
	var slowMu sync.Mutex
	slowUntil := time.Time{}
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		slowMu.Lock()
		slow := time.Now().Before(slowUntil)
		slowMu.Unlock()
		switch {
		case off%97 == 0:
			time.Sleep(3 * inlineRescue) // past the watchdog
		case slow:
			time.Sleep(200 * time.Microsecond)
		}
		return nil
	}
	ts := startServer(t, Config{MaxRequestsPerConn: 16}, Export{Name: "a", Size: size, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", true)

	want := make([]byte, size)
	for round := 0; round < 6; round++ {
		if round%2 == 1 {
			slowMu.Lock()
			slowUntil = time.Now().Add(20 * time.Millisecond)
			slowMu.Unlock()
		}
		// Writes to disjoint ranges (NBD does not order requests in
		// flight), with refused requests in between.
		type req struct {
			off    uint64
			length uint32
			bad    bool
		}
		var reqs []req
		var off uint64
		for off < size {
			n := uint64(1 + rng.IntN(3*inlineMaxLen/2))
			if rng.IntN(4) == 0 {
				n = uint64(1 + rng.IntN(4096))
			}
			n = min(n, size-off)
			reqs = append(reqs, req{off: off, length: uint32(n)})
			off += n
			if rng.IntN(10) == 0 {
				reqs = append(reqs, req{off: size - 1, length: 2, bad: true})
			}
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			var buf bytes.Buffer
			for i, r := range reqs {
				p := make([]byte, r.length)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if !r.bad {
					copy(want[r.off:], p)
				}
				h := make([]byte, 28)
				binary.BigEndian.PutUint32(h, magicRequest)
				binary.BigEndian.PutUint16(h[6:], uint16(CmdWrite))
				binary.BigEndian.PutUint64(h[8:], uint64(i))
				binary.BigEndian.PutUint64(h[16:], r.off)
				binary.BigEndian.PutUint32(h[24:], r.length)
				buf.Write(h)
				buf.Write(p)
			}
			rc.c.Write(buf.Bytes())
		}()
		seen := make([]bool, len(reqs))
		for range reqs {
			c := rc.chunk()
			if c.cookie >= uint64(len(reqs)) || seen[c.cookie] {
				t.Fatalf("round %d: reply for cookie %d: unknown or repeated", round, c.cookie)
			}
			seen[c.cookie] = true
			if r := reqs[c.cookie]; r.bad {
				if e, _ := chunkErrno(t, c); e != EINVAL && e != ENOSPC {
					t.Fatalf("round %d: refused write %d: errno %v", round, c.cookie, e)
				}
			} else if c.typ != ReplyNone {
				e, msg := chunkErrno(t, c)
				t.Fatalf("round %d: write %d (%d bytes at %d): %v %s", round, c.cookie, r.length, r.off, e, msg)
			}
		}
		<-done
		// Read everything back in a burst of 32 KiB reads.
		const rlen = 32 << 10
		var buf bytes.Buffer
		for i := uint64(0); i < size/rlen; i++ {
			h := make([]byte, 28)
			binary.BigEndian.PutUint32(h, magicRequest)
			binary.BigEndian.PutUint16(h[6:], uint16(CmdRead))
			binary.BigEndian.PutUint64(h[8:], i)
			binary.BigEndian.PutUint64(h[16:], i*rlen)
			binary.BigEndian.PutUint32(h[24:], rlen)
			buf.Write(h)
		}
		go rc.c.Write(buf.Bytes())
		for range size / rlen {
			c := rc.chunk()
			if c.typ != ReplyOffsetData || c.flags&replyFlagDone == 0 {
				t.Fatalf("round %d: read %d: chunk %v flags %#x", round, c.cookie, c.typ, c.flags)
			}
			o := binary.BigEndian.Uint64(c.payload)
			if o != c.cookie*rlen || !bytes.Equal(c.payload[8:], want[o:o+rlen]) {
				t.Fatalf("round %d: read %d at %d: data differs from what was written", round, c.cookie, o)
			}
		}
	}
}
