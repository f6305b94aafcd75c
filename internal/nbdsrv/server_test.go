package nbdsrv

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

func TestAddExportValidation(t *testing.T) {
	s := NewServer(Config{})
	b := newMem(4096)
	for _, e := range []Export{
		{Name: "nobackend", Size: 1},
		{Name: "neg", Size: -1, Backend: b},
		{Name: string(make([]byte, 4097)), Backend: b},
		{Name: "min", Backend: b, MinBlock: 3},
		{Name: "min2", Backend: b, MinBlock: 128 << 10},
		{Name: "pref", Backend: b, MinBlock: 4096, PreferredBlock: 512},
		{Name: "max", Backend: b, MaxBlock: 64 << 20},
		{Name: "maxmul", Backend: b, MinBlock: 512, MaxBlock: 1000},
	} {
		if err := s.AddExport(e); !errors.Is(err, ErrInvalidExport) {
			t.Errorf("AddExport(%.20q): %v, want ErrInvalidExport", e.Name, err)
		}
	}
	if err := s.AddExport(Export{Name: "ok", Size: 4096, Backend: b}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(Export{Name: "ok", Size: 4096, Backend: b}); !errors.Is(err, ErrExportExists) {
		t.Errorf("duplicate: %v", err)
	}
	if err := s.RemoveExport("nope", false); !errors.Is(err, ErrNoExport) {
		t.Errorf("remove unknown: %v", err)
	}
}

func TestRemoveExport(t *testing.T) {
	m := newMem(1 << 20)
	ts := startServer(t, Config{}, Export{Name: "snap", Size: 1 << 20, Backend: m}, Export{Name: "other", Size: 1 << 20, Backend: m})
	rc := dialRaw(t, ts.addr)
	rc.open("snap", false)
	if n := ts.OpenConns("snap"); n != 1 {
		t.Fatalf("OpenConns = %d", n)
	}
	if err := ts.RemoveExport("snap", false); !errors.Is(err, ErrExportBusy) {
		t.Fatalf("remove busy: %v", err)
	}
	// Still served after the refusal.
	rc.request(CmdRead, 0, 1, 0, 1, nil)
	if e, _, _ := rc.simple(1); e != 0 {
		t.Fatalf("read: %v", e)
	}
	// A negotiating client (not yet in transmission) does not hold it.
	neg := dialRaw(t, ts.addr)
	neg.handshake(ClientFlagFixedNewstyle)
	bystander := dialRaw(t, ts.addr)
	bystander.open("other", false)
	if err := ts.RemoveExport("snap", true); err != nil {
		t.Fatalf("forced remove: %v", err)
	}
	rc.expectClosed()
	if n := ts.OpenConns("snap"); n != 0 {
		t.Errorf("OpenConns after remove = %d", n)
	}
	neg.sendOpt(OptGo, nameAndInfos("snap"))
	neg.expectRep(OptGo, RepErrUnknown)
	bystander.request(CmdRead, 0, 1, 0, 1, nil)
	if e, _, _ := bystander.simple(1); e != 0 {
		t.Errorf("bystander: %v", e)
	}
	// Removing an idle export needs no force; the name can be reused.
	if err := ts.AddExport(Export{Name: "snap", Size: 4096, Backend: m}); err != nil {
		t.Fatal(err)
	}
	if err := ts.RemoveExport("snap", false); err != nil {
		t.Errorf("remove idle: %v", err)
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	m := newMem(1 << 20)
	started := make(chan struct{})
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		if off == 4096 {
			close(started)
			time.Sleep(200 * time.Millisecond)
			return ctx.Err() // nil unless the request was cancelled
		}
		return nil
	}
	s := NewServer(Config{})
	if err := s.AddExport(Export{Name: "a", Size: 1 << 20, Backend: m}); err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	l1, err := net.Listen("unix", filepath.Join(dir, "1.sock"))
	if err != nil {
		t.Fatal(err)
	}
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	go func() { done <- s.Serve(l1) }()
	go func() { done <- s.Serve(l2) }()

	// Both listeners serve.
	tc, err := net.Dial("tcp", l2.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tcp := &rawClient{t: t, c: tc, br: newReader(tc)}
	tcp.open("a", false)
	rc := dialRaw(t, filepath.Join(dir, "1.sock"))
	rc.open("a", true)
	rc.request(CmdWrite, 0, 9, 4096, 512, pattern(512, 1))
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// The write in flight completed and was answered before the close.
	if c := rc.chunk(); c.typ != ReplyNone || c.cookie != 9 {
		t.Errorf("in-flight write reply: %v", c.typ)
	}
	rc.expectClosed()
	tcp.expectClosed()
	for i := 0; i < 2; i++ {
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}
	if err := s.Serve(l1); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Shutdown: %v", err)
	}
}

func TestShutdownDeadlineCancels(t *testing.T) {
	m := newMem(1 << 20)
	started := make(chan struct{})
	m.hook = func(ctx context.Context, op string, off, length int64) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}
	s := NewServer(Config{})
	s.AddExport(Export{Name: "a", Size: 1 << 20, Backend: m})
	l, _ := net.Listen("unix", filepath.Join(shortTempDir(t), "s.sock"))
	go s.Serve(l)
	rc := dialRaw(t, l.Addr().String())
	rc.open("a", false)
	rc.request(CmdRead, 0, 1, 0, 1, nil)
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want DeadlineExceeded", err)
	}
	rc.expectClosed()
}

func TestMaxConns(t *testing.T) {
	ts := startServer(t, Config{MaxConns: 2}, Export{Name: "a", Size: 4096, Backend: newMem(4096)})
	a := dialRaw(t, ts.addr)
	a.read(18)
	b := dialRaw(t, ts.addr)
	b.read(18)
	c := dialRaw(t, ts.addr)
	c.expectClosed()
	waitLog(t, ts, "too many connections")
	a.c.Close()
	waitFor(t, func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		return len(ts.conns) == 1
	})
	d := dialRaw(t, ts.addr)
	d.open("a", false)
}
