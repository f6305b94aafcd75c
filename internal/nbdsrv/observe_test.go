package nbdsrv

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// observed is one Config.Observe call.
type observed struct {
	export string
	cmd    Cmd
	bytes  int
	errno  Errno
}

func TestObserve(t *testing.T) {
	var mu sync.Mutex
	var got []observed
	cfg := Config{Observe: func(export string, cmd Cmd, bytes int, d time.Duration, errno Errno) {
		mu.Lock()
		got = append(got, observed{export, cmd, bytes, errno})
		mu.Unlock()
	}}
	ts := startServer(t, cfg, Export{Name: "a", Size: 1 << 20, Backend: newMem(1 << 20)})
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	rc.request(CmdWrite, 0, 1, 0, 4096, pattern(4096, 1))
	if e, _, _ := rc.simple(0); e != 0 {
		t.Fatalf("write: %v", e)
	}
	rc.request(CmdRead, 0, 2, 0, 8192, nil)
	if e, _, _ := rc.simple(8192); e != 0 {
		t.Fatalf("read: %v", e)
	}
	rc.request(CmdFlush, 0, 3, 0, 0, nil)
	if e, _, _ := rc.simple(0); e != 0 {
		t.Fatalf("flush: %v", e)
	}
	// Out of range: refused by validate, observed with its errno.
	rc.request(CmdRead, 0, 4, 1<<20, 4096, nil)
	if e, _, _ := rc.simple(0); e != EINVAL {
		t.Fatalf("read past the end: %v, want EINVAL", e)
	}
	want := []observed{
		{"a", CmdWrite, 4096, 0},
		{"a", CmdRead, 8192, 0},
		{"a", CmdFlush, 0, 0},
		{"a", CmdRead, 4096, EINVAL},
	}
	// The reply goes out after Observe returns, so every call is in.
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("observed\n%v\nwant\n%v", got, want)
	}
}

// BenchmarkObserve measures a 4 KiB read round trip with and without an
// Observe hook, to show what timing every request costs the hot path.
func BenchmarkObserve(b *testing.B) {
	for _, hooked := range []bool{false, true} {
		b.Run(fmt.Sprintf("hook=%v", hooked), func(b *testing.B) {
			var cfg Config
			if hooked {
				var mu sync.Mutex
				var n int64
				cfg.Observe = func(string, Cmd, int, time.Duration, Errno) { mu.Lock(); n++; mu.Unlock() }
			}
			ts := startServer(b, cfg, Export{Name: "a", Size: 1 << 20, Backend: newMem(1 << 20)})
			rc := dialRaw(b, ts.addr)
			rc.open("a", false)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := range b.N {
				rc.request(CmdRead, 0, uint64(i), 0, 4096, nil)
				if e, _, _ := rc.simple(4096); e != 0 {
					b.Fatalf("read: %v", e)
				}
			}
		})
	}
}
