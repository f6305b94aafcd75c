package nbdsrv

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestReadWriteSimple(t *testing.T) {
	m := newMem(1 << 20)
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	data := pattern(8192, 3)
	rc.request(CmdWrite, FlagFUA, 1, 4096, 8192, data)
	if e, c, _ := rc.simple(0); e != 0 || c != 1 {
		t.Fatalf("write: %v %d", e, c)
	}
	rc.request(CmdRead, 0, 2, 4096, 8192, nil)
	if e, c, got := rc.simple(8192); e != 0 || c != 2 || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v %d equal=%v", e, c, bytes.Equal(got, data))
	}
	if !slices.Contains(m.ops(), "write+fua") {
		t.Errorf("FUA not passed to the backend: %v", m.ops())
	}
	// Zero data with simple replies is still sent as data.
	rc.request(CmdRead, 0, 3, 1<<19, 4096, nil)
	if e, _, got := rc.simple(4096); e != 0 || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("read zeros: %v", e)
	}
}

func TestReadStructured(t *testing.T) {
	m := newMem(1 << 20)
	copy(m.data[8192:], pattern(4096, 9))
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", true)
	for _, flags := range []CmdFlags{0, FlagDF} {
		rc.request(CmdRead, flags, 5, 8192, 4096, nil)
		c := rc.chunk()
		if c.typ != ReplyOffsetData || c.flags != replyFlagDone || c.cookie != 5 ||
			binary.BigEndian.Uint64(c.payload) != 8192 || !bytes.Equal(c.payload[8:], pattern(4096, 9)) {
			t.Errorf("data chunk: %v flags %d cookie %d len %d", c.typ, c.flags, c.cookie, len(c.payload))
		}
		// An all-zero range comes back as a hole.
		rc.request(CmdRead, flags, 6, 0, 8192, nil)
		c = rc.chunk()
		if c.typ != ReplyOffsetHole || c.flags != replyFlagDone || binary.BigEndian.Uint64(c.payload) != 0 ||
			binary.BigEndian.Uint32(c.payload[8:]) != 8192 {
			t.Errorf("hole chunk: %v % x", c.typ, c.payload)
		}
	}
	// Short zero reads are not worth a hole.
	rc.request(CmdRead, 0, 7, 0, 100, nil)
	if c := rc.chunk(); c.typ != ReplyOffsetData || len(c.payload) != 108 {
		t.Errorf("short read: %v", c.typ)
	}
	// Other commands answer with NONE.
	rc.request(CmdFlush, 0, 8, 0, 0, nil)
	if c := rc.chunk(); c.typ != ReplyNone || c.flags != replyFlagDone || c.cookie != 8 || len(c.payload) != 0 {
		t.Errorf("flush: %+v", c)
	}
}

func TestCommands(t *testing.T) {
	m := newMem(1 << 20)
	wo := newMem(1 << 20)
	ts := startServer(t, Config{},
		Export{Name: "full", Size: 1 << 20, Backend: m},
		Export{Name: "bare", Size: 1 << 20, Backend: writeOnlyMem{wo}})
	rc := dialRaw(t, ts.addr)
	ei, _ := rc.open("full", false)
	want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero | FlagSendCache
	if ei.flags != want {
		t.Errorf("flags %v, want %v", ei.flags, want)
	}
	m.fill(0xff)
	steps := []struct {
		cmd        Cmd
		flags      CmdFlags
		off        uint64
		length     uint32
		op         string
		zeroedFrom int
	}{
		{CmdFlush, 0, 0, 0, "flush", -1},
		{CmdTrim, FlagFUA, 0, 4096, "trim", 0},
		{CmdWriteZeroes, 0, 8192, 4096, "zero", 8192},
		{CmdWriteZeroes, FlagNoHole, 16384, 4096, "zero+nohole", 16384},
		{CmdWriteZeroes, FlagFastZero, 24576, 4096, "zero+fast", 24576},
		{CmdCache, 0, 0, 1 << 20, "cache", -1},
	}
	for i, s := range steps {
		rc.request(s.cmd, s.flags, uint64(i), s.off, s.length, nil)
		if e, c, _ := rc.simple(0); e != 0 || c != uint64(i) {
			t.Errorf("%v: %v", s.cmd, e)
		}
		if ops := m.ops(); ops[len(ops)-1] != s.op {
			t.Errorf("%v: backend saw %v, want %s", s.cmd, ops[len(ops)-1], s.op)
		}
		if s.zeroedFrom >= 0 && !bytes.Equal(m.bytesAt(s.zeroedFrom, 4096), make([]byte, 4096)) {
			t.Errorf("%v did not zero", s.cmd)
		}
	}

	// Without a Zeroer, write zeroes is emulated by writes; a fast zero is
	// refused with ENOTSUP and does nothing.
	rc = dialRaw(t, ts.addr)
	ei, _ = rc.open("bare", false)
	if want := FlagHasFlags | FlagSendFUA | FlagSendWriteZeroes | FlagSendFastZero; ei.flags != want {
		t.Errorf("bare flags %v, want %v", ei.flags, want)
	}
	wo.fill(0xff)
	rc.request(CmdWriteZeroes, FlagFastZero, 1, 0, 3<<18, nil)
	if e, _, _ := rc.simple(0); e != ENOTSUP {
		t.Errorf("fast zero emulated: %v, want ENOTSUP", e)
	}
	if wo.bytesAt(0, 1)[0] != 0xff {
		t.Error("a refused fast zero wrote")
	}
	rc.request(CmdWriteZeroes, 0, 2, 0, 3<<18+5, nil)
	if e, _, _ := rc.simple(0); e != 0 {
		t.Errorf("emulated zero: %v", e)
	}
	if !bytes.Equal(wo.bytesAt(0, 3<<18+5), make([]byte, 3<<18+5)) || wo.bytesAt(3<<18+5, 1)[0] != 0xff {
		t.Error("emulated zero wrote the wrong range")
	}
	for _, c := range []Cmd{CmdFlush, CmdTrim, CmdCache} {
		rc.request(c, 0, 3, 0, 0, nil)
		if e, _, _ := rc.simple(0); e != EINVAL {
			t.Errorf("%v on bare: %v, want EINVAL", c, e)
		}
	}
}

func TestBlockStatus(t *testing.T) {
	m := newMem(1 << 20)
	m.extents = []Extent{{4096, 0}, {4096, 0}, {8192, ExtentHole | ExtentZero}, {1<<20 - 16384, ExtentZero}}
	dirty := staticContext{name: "qemu:dirty-bitmap:b", exts: []Extent{{65536, ExtentDirty}, {1<<20 - 65536, 0}}}
	ts := startServer(t, Config{},
		Export{Name: "a", Size: 1 << 20, Backend: m, MetaContexts: contextList(dirty)},
		Export{Name: "plain", Size: 1 << 20, Backend: readOnlyMem{newMem(1 << 20)}})

	descs := func(p []byte) [][2]uint32 {
		var d [][2]uint32
		for p = p[4:]; len(p) >= 8; p = p[8:] {
			d = append(d, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		return d
	}
	rc := dialRaw(t, ts.addr)
	_, ids := rc.open("a", true, "base:allocation", "qemu:dirty-bitmap:b")
	byName := map[string]uint32{}
	for id, n := range ids {
		byName[n] = id
	}
	rc.request(CmdBlockStatus, 0, 11, 0, 1<<20, nil)
	got := map[uint32][][2]uint32{}
	for i := 0; i < 2; i++ {
		c := rc.chunk()
		if c.typ != ReplyBlockStatus || c.cookie != 11 || (c.flags == replyFlagDone) != (i == 1) {
			t.Fatalf("chunk %d: %v flags %d", i, c.typ, c.flags)
		}
		got[binary.BigEndian.Uint32(c.payload)] = descs(c.payload)
	}
	wantBase := [][2]uint32{{8192, 0}, {8192, 3}, {1<<20 - 16384, 2}} // equal neighbours merged
	wantDirty := [][2]uint32{{65536, 1}, {1<<20 - 65536, 0}}
	if !slices.Equal(got[byName["base:allocation"]], wantBase) || !slices.Equal(got[byName["qemu:dirty-bitmap:b"]], wantDirty) {
		t.Errorf("block status %v, want base %v dirty %v", got, wantBase, wantDirty)
	}
	// REQ_ONE: one descriptor, never longer than asked; clipped to the request.
	rc.request(CmdBlockStatus, FlagReqOne, 12, 10000, 1000, nil)
	for i := 0; i < 2; i++ {
		c := rc.chunk()
		d := descs(c.payload)
		if len(d) != 1 || d[0][0] > 1000 {
			t.Errorf("REQ_ONE: %v", d)
		}
	}
	// Out of range, zero length.
	for _, r := range [][2]uint64{{1 << 20, 1}, {0, 0}} {
		rc.request(CmdBlockStatus, 0, 13, r[0], uint32(r[1]), nil)
		if e, _ := chunkErrno(t, rc.chunk()); e != EINVAL {
			t.Errorf("block status %v: %v", r, e)
		}
	}
	// A failing context answers with an error chunk; the connection stays.
	m.setHook(func(ctx context.Context, op string, off, length int64) error {
		if op == "extents" {
			return syscall.EIO
		}
		return nil
	})
	rc.request(CmdBlockStatus, 0, 14, 0, 4096, nil)
	if e, _ := chunkErrno(t, rc.chunk()); e != EIO {
		t.Errorf("failing extents: %v", e)
	}
	m.setHook(nil)
	m.setExtents([]Extent{{0, 0}})
	rc.request(CmdBlockStatus, 0, 15, 0, 4096, nil)
	if e, _ := chunkErrno(t, rc.chunk()); e != EIO {
		t.Errorf("empty extents: %v", e)
	}

	// Without an Extenter, base:allocation is all data.
	rc = dialRaw(t, ts.addr)
	rc.open("plain", true, "base:allocation")
	rc.request(CmdBlockStatus, 0, 1, 4096, 8192, nil)
	c := rc.chunk()
	if d := descs(c.payload); c.flags != replyFlagDone || !slices.Equal(d, [][2]uint32{{8192, 0}}) {
		t.Errorf("default base:allocation: %v", d)
	}
}

// However many runs a context answers, a reply carries at most
// maxBlockStatusDescs descriptors (one with REQ_ONE), consecutive and
// within the request; the client asks again for the rest.
func TestBlockStatusBounded(t *testing.T) {
	const n = 3 * maxBlockStatusDescs
	var exts []Extent
	for i := range n {
		exts = append(exts, Extent{Length: 512, Flags: uint32(i % 2)})
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: n * 512, Backend: newMem(n * 512),
		MetaContexts: contextList(staticContext{name: "x-test:striped", exts: exts})})
	rc := dialRaw(t, ts.addr)
	rc.open("a", true, "x-test:striped")
	for _, tc := range []struct {
		flags CmdFlags
		want  int
	}{{0, maxBlockStatusDescs}, {FlagReqOne, 1}} {
		rc.request(CmdBlockStatus, tc.flags, 1, 512, n*512-512, nil)
		c := rc.chunk()
		if c.typ != ReplyBlockStatus || c.flags != replyFlagDone {
			t.Fatalf("flags %v: chunk %v", tc.flags, c.typ)
		}
		d := c.payload[4:]
		if len(d) != 8*tc.want {
			t.Fatalf("flags %v: %d descriptors, want %d", tc.flags, len(d)/8, tc.want)
		}
		for i := 0; i < tc.want; i++ {
			l, f := binary.BigEndian.Uint32(d[8*i:]), binary.BigEndian.Uint32(d[8*i+4:])
			if l != 512 || f != uint32((i+1)%2) {
				t.Fatalf("flags %v: descriptor %d = %d, %d", tc.flags, i, l, f)
			}
		}
	}
}

func TestErrorReplies(t *testing.T) {
	m := newMem(1 << 20)
	type errBox struct{ err error }
	var fail atomic.Value // errBox
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		if off == 4096 {
			if b, ok := fail.Load().(errBox); ok {
				return b.err
			}
		}
		return nil
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m},
		Export{Name: "ro", Size: 1 << 20, Backend: m, ReadOnly: true})
	for _, structured := range []bool{false, true} {
		errno := func(rc *rawClient, dataLen int) Errno {
			if !structured {
				e, _, _ := rc.simple(dataLen)
				return e
			}
			c := rc.chunk()
			if c.typ == ReplyNone || c.typ == ReplyOffsetData || c.typ == ReplyOffsetHole {
				return 0
			}
			e, _ := chunkErrno(t, c)
			return e
		}
		t.Run(fmt.Sprint("structured=", structured), func(t *testing.T) {
			rc := dialRaw(t, ts.addr)
			rc.open("a", structured)
			for _, tt := range []struct {
				err  error
				want Errno
			}{
				{syscall.EIO, EIO}, {fmt.Errorf("x: %w", syscall.ENOSPC), ENOSPC}, {fmt.Errorf("opaque"), EIO},
			} {
				fail.Store(errBox{tt.err})
				rc.request(CmdRead, 0, 1, 4096, 512, nil)
				if structured {
					c := rc.chunk()
					e, msg := chunkErrno(t, c)
					if c.typ != ReplyErrorOffset || binary.BigEndian.Uint64(c.payload[6+len(msg):]) != 4096 || e != tt.want {
						t.Errorf("read error: %v %v", c.typ, e)
					}
				} else if e := errno(rc, 512); e != tt.want {
					t.Errorf("read error %v: %v, want %v", tt.err, e, tt.want)
				}
				rc.request(CmdWrite, 0, 2, 4096, 512, make([]byte, 512))
				if e := errno(rc, 0); e != tt.want {
					t.Errorf("write error %v: %v, want %v", tt.err, e, tt.want)
				}
			}
			fail.Store(errBox{})
			// Semantic errors: an error reply, the write payload skipped,
			// the connection in step.
			for _, tt := range []struct {
				cmd     Cmd
				off     uint64
				length  uint32
				payload []byte
				want    Errno
			}{
				{CmdRead, 1 << 20, 1, nil, EINVAL},
				{CmdRead, 0, 0xffffffff, nil, EINVAL},
				{CmdRead, 0, 32<<20 + 1, nil, EINVAL},
				{CmdWrite, 1<<20 - 1, 2, []byte{1, 2}, ENOSPC},
				{CmdWrite, 0, 0, nil, EINVAL},
				{77, 0, 1, nil, EINVAL},
			} {
				rc.request(tt.cmd, 0, 3, tt.off, tt.length, tt.payload)
				if e := errno(rc, int(tt.length)); e != tt.want {
					t.Errorf("%v %d+%d: %v, want %v", tt.cmd, tt.off, tt.length, e, tt.want)
				}
			}
			// A refused read is a plain ERROR chunk: ERROR_OFFSET must lie
			// inside the request, which a zero-length one does not have.
			if structured {
				rc.request(CmdRead, 0, 4, 100, 0, nil)
				if c := rc.chunk(); c.typ != ReplyError {
					t.Errorf("refused read: %v, want %v", c.typ, ReplyError)
				}
			}
			rc.request(CmdRead, 0, 4, 0, 1, nil)
			if e := errno(rc, 1); e != 0 {
				t.Errorf("read after errors: %v", e)
			}

			rc = dialRaw(t, ts.addr)
			rc.open("ro", structured)
			rc.request(CmdWrite, 0, 5, 0, 4096, pattern(4096, 1))
			if e := errno(rc, 0); e != EPERM {
				t.Errorf("write to read-only: %v", e)
			}
			rc.request(CmdRead, 0, 6, 0, 1, nil)
			if e := errno(rc, 1); e != 0 {
				t.Errorf("read after refused write: %v", e)
			}
		})
	}
	if !contains(ts.logs.String(), "request failed") || !contains(ts.logs.String(), "cookie=") {
		t.Errorf("backend errors not logged with the cookie:\n%s", ts.logs.String())
	}
}

func TestFramingErrors(t *testing.T) {
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: newMem(1 << 20)},
		Export{Name: "small", Size: 4 << 20, Backend: newMem(4 << 20), MaxBlock: 1 << 20})
	other := dialRaw(t, ts.addr)
	other.open("a", false)

	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	rc.write(make([]byte, 28)) // bad magic
	rc.expectClosed()
	waitLog(t, ts, "bad request magic")

	// A write too long to skip ends the connection.
	for _, n := range []uint32{0xffffffff, 32<<20 + 1} {
		rc = dialRaw(t, ts.addr)
		rc.open("a", false)
		rc.request(CmdWrite, 0, 1, 0, n, nil)
		rc.expectClosed()
	}
	// A write over the export's maximum but skippable is refused.
	rc = dialRaw(t, ts.addr)
	rc.open("small", false)
	rc.request(CmdWrite, 0, 1, 0, 1<<20+1, make([]byte, 1<<20+1))
	if e, _, _ := rc.simple(0); e != EINVAL {
		t.Errorf("write max+1: %v", e)
	}
	rc.request(CmdRead, 0, 2, 0, 1<<20+1, nil)
	if e, _, _ := rc.simple(0); e != EINVAL {
		t.Errorf("read max+1: %v", e)
	}
	// The other client never noticed.
	other.request(CmdRead, 0, 1, 0, 512, nil)
	if e, _, _ := other.simple(512); e != 0 {
		t.Errorf("bystander: %v", e)
	}
}

func TestDisconnectCommand(t *testing.T) {
	m := newMem(1 << 20)
	release := make(chan struct{})
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		if op == "read" {
			<-release
		}
		return nil
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	rc.request(CmdRead, 0, 1, 0, 512, nil)
	rc.request(CmdDisc, 0, 2, 0, 0, nil)
	time.Sleep(50 * time.Millisecond)
	close(release)
	// The read in flight is still answered, then the server closes.
	if e, c, _ := rc.simple(512); e != 0 || c != 1 {
		t.Errorf("in-flight read: %v %d", e, c)
	}
	rc.expectClosed()
}

// Replies go out as requests finish, not in request order, and at most
// MaxRequestsPerConn run at once.
func TestPipelining(t *testing.T) {
	m := newMem(1 << 20)
	var running, peak atomic.Int32
	gate := make(chan struct{})
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if off == 0 {
			<-gate // the first request waits for the last
		}
		time.Sleep(2 * time.Millisecond)
		return nil
	}
	ts := startServer(t, Config{MaxRequestsPerConn: 4}, Export{Name: "a", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	for i := 0; i < 10; i++ {
		rc.request(CmdRead, 0, uint64(i), uint64(i)*4096, 4096, nil)
	}
	var order []uint64
	for i := 0; i < 3; i++ { // requests 1..3 finish while 0 waits
		_, c, _ := rc.simple(4096)
		order = append(order, c)
	}
	close(gate)
	for i := 3; i < 10; i++ {
		_, c, _ := rc.simple(4096)
		order = append(order, c)
	}
	if order[0] == 0 {
		t.Errorf("replies in request order %v: no overtaking", order)
	}
	if p := peak.Load(); p > 4 || p < 2 {
		t.Errorf("peak concurrency %d, want 2..4", p)
	}
}

// The byte budget admits a request larger than itself alone and keeps the
// rest waiting.
func TestByteBudget(t *testing.T) {
	b := newBudget(10, 100)
	if !b.acquire(60) || !b.acquire(40) {
		t.Fatal("acquire within budget")
	}
	done := make(chan bool)
	go func() { done <- b.acquire(1) }()
	select {
	case <-done:
		t.Fatal("acquire beyond the budget did not wait")
	case <-time.After(50 * time.Millisecond):
	}
	b.release(60)
	if !<-done {
		t.Fatal("acquire after release failed")
	}
	b.release(40)
	b.release(1)
	if !b.acquire(1000) {
		t.Fatal("oversize request not admitted alone")
	}
	go func() { done <- b.acquire(1) }()
	select {
	case <-done:
		t.Fatal("admitted next to an oversize request")
	case <-time.After(50 * time.Millisecond):
	}
	b.close()
	if <-done {
		t.Fatal("acquire on a closed budget succeeded")
	}
}

func TestDisconnectCancels(t *testing.T) {
	m := newMem(1 << 20)
	started := make(chan struct{}, 8)
	cancelled := make(chan struct{}, 8)
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		started <- struct{}{}
		<-ctx.Done()
		cancelled <- struct{}{}
		return ctx.Err()
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	rc.request(CmdRead, 0, 1, 0, 512, nil)
	rc.request(CmdWrite, 0, 2, 0, 512, make([]byte, 512))
	<-started
	<-started
	rc.c.Close()
	for i := 0; i < 2; i++ {
		select {
		case <-cancelled:
		case <-time.After(5 * time.Second):
			t.Fatal("in-flight request not cancelled on disconnect")
		}
	}
	waitFor(t, func() bool { return ts.OpenConns("a") == 0 })
}

func TestPanicClosesOnlyThatConnection(t *testing.T) {
	m := newMem(1 << 20)
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		if off == 666 {
			panic("backend bug")
		}
		return nil
	}
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: m})
	other := dialRaw(t, ts.addr)
	other.open("a", true)
	rc := dialRaw(t, ts.addr)
	rc.open("a", false)
	rc.request(CmdRead, 0, 1, 666, 1, nil)
	rc.expectClosed()
	waitLog(t, ts, "backend bug")
	waitLog(t, ts, "goroutine")
	other.request(CmdRead, 0, 1, 0, 4096, nil)
	if c := other.chunk(); c.typ != ReplyOffsetHole {
		t.Errorf("bystander: %v", c.typ)
	}
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not reached")
}

// Many clients at once on one export, with the race detector watching.
func TestConcurrentClients(t *testing.T) {
	const size = 4 << 20
	m := newMem(size)
	ts := startServer(t, Config{}, Export{Name: "a", Size: size, Backend: m, MultiConn: true})
	var wg sync.WaitGroup
	for k := 0; k < 4; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc := dialRaw(t, ts.addr)
			rc.open("a", k%2 == 0)
			base := uint64(k) << 20
			for i := 0; i < 64; i++ {
				rc.request(CmdWrite, 0, uint64(i), base+uint64(i)*4096, 4096, pattern(4096, byte(k+i)))
			}
			seen := map[uint64]bool{}
			for i := 0; i < 64; i++ {
				var c uint64
				if k%2 == 0 {
					c = rc.chunk().cookie
				} else {
					_, c, _ = rc.simple(0)
				}
				seen[c] = true
			}
			if len(seen) != 64 {
				t.Errorf("client %d: %d distinct cookies", k, len(seen))
			}
		}()
	}
	wg.Wait()
	for k := 0; k < 4; k++ {
		for i := 0; i < 64; i++ {
			off := k<<20 + i*4096
			if !bytes.Equal(m.bytesAt(off, 4096), pattern(4096, byte(k+i))) {
				t.Fatalf("client %d write %d lost", k, i)
			}
		}
	}
}
