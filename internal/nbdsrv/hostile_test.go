package nbdsrv

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/internal/tlstest"
)

// Hostile clients against the server running as a process of its own
// (test/bench/fileserver, built without the race detector, whose shadow
// memory would swamp the measurement), so that its memory can be measured
// alone: every attack must end with the offender answered or dropped, the
// other clients served, and the server's RSS (peak included) grown by less
// than 64 MiB. Every attack runs in plain text and again over TLS (on a
// listener that requires it, after a STARTTLS with a client certificate).

func TestHostileClients(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server process and 1000 connections")
	}
	dir := shortTempDir(t)
	bin := filepath.Join(dir, "fileserver")
	build := exec.Command("go", "build", "-o", bin, "github.com/nbdsnap/nbdsnap/test/bench/fileserver")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the server: %v\n%s", err, out)
	}
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	pki := tlstest.New(t)
	cert, key, ca := pki.WriteServerFiles(t, dir)
	for _, tr := range []struct {
		name string
		args []string    // the server's
		tls  *tls.Config // the clients'; nil: plain
	}{
		{"plain", nil, nil},
		{"tls", []string{"-tls-cert", cert, "-tls-key", key, "-tls-ca", ca, "-tls-required"}, pki.ClientConfig(&pki.Alice)},
	} {
		t.Run(tr.name, func(t *testing.T) {
			hostileClients(t, bin, img, filepath.Join(dir, tr.name+".sock"), tr.args, tr.tls)
		})
	}
}

// hostileClients runs the attacks against a server started from bin on a
// unix socket at sock, with the clients speaking TLS when tlsCfg is set.
func hostileClients(t *testing.T, bin, img, sock string, serverArgs []string, tlsCfg *tls.Config) {
	// dial connects; the client's handshake then starts TLS if tlsCfg is
	// set.
	dial := func() *rawClient {
		rc := dialRaw(t, sock)
		rc.tls = tlsCfg
		return rc
	}
	cmd := exec.Command(bin, append([]string{"-file", img, "-unix", sock, "-name", "disk", "-max-conns", "2000",
		"-handshake-timeout", "2s"}, serverArgs...)...)
	serverLog := &testenv.SyncBuffer{}
	cmd.Stderr = serverLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("server log:\n%s", serverLog.String())
		}
	})
	waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil })
	pid := cmd.Process.Pid

	// A well-behaved client, checked after every attack.
	good := dial()
	good.c.SetDeadline(time.Time{})
	good.open("disk", true)
	cookie := uint64(0)
	checkGood := func(after string) {
		t.Helper()
		cookie++
		good.c.SetDeadline(time.Now().Add(10 * time.Second))
		payload := pattern(4096, byte(cookie))
		good.request(CmdWrite, 0, cookie, 0, 4096, payload)
		if c := good.chunk(); c.typ != ReplyNone || c.cookie != cookie {
			t.Fatalf("after %s: write reply %v", after, c.typ)
		}
		good.request(CmdRead, 0, cookie, 0, 4096, nil)
		c := good.chunk()
		if c.typ != ReplyOffsetData || string(c.payload[8:]) != string(payload) {
			t.Fatalf("after %s: read reply %v", after, c.typ)
		}
		good.c.SetDeadline(time.Time{})
	}
	checkGood("start")
	time.Sleep(100 * time.Millisecond)
	base := testenv.ProcStatus(t, pid, "VmRSS")
	t.Logf("server RSS at start: %d KiB", base>>10)

	optHeader := func(opt Opt, length uint32) []byte {
		h := make([]byte, 16)
		binary.BigEndian.PutUint64(h, magicIHaveOpt)
		binary.BigEndian.PutUint32(h[8:], uint32(opt))
		binary.BigEndian.PutUint32(h[12:], length)
		return h
	}
	// stream writes up to n bytes and reports how many went through
	// before the server closed.
	stream := func(rc *rawClient, n int64) int64 {
		buf := make([]byte, 1<<20)
		var sent int64
		rc.c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for sent < n {
			k, err := rc.c.Write(buf[:min(int64(len(buf)), n-sent)])
			sent += int64(k)
			if err != nil {
				break
			}
		}
		return sent
	}

	t.Run("export name length 0xFFFFFFF0", func(t *testing.T) {
		rc := dial()
		rc.handshake(ClientFlagFixedNewstyle)
		rc.write(optHeader(OptExportName, 0xfffffff0))
		rc.expectClosed()
		// Inside GO: the name length field lies, the option is small.
		rc = dial()
		rc.handshake(ClientFlagFixedNewstyle)
		rc.sendOpt(OptGo, append(be32(0xfffffff0), "disk"...))
		rc.expectRep(OptGo, RepErrInvalid)
		// And as the GO option's own length.
		rc.write(optHeader(OptGo, 0xfffffff0))
		rc.expectClosed()
		checkGood("0xFFFFFFF0 name")
	})
	t.Run("1 GiB name streamed", func(t *testing.T) {
		for _, opt := range []Opt{OptExportName, OptGo, 99} {
			rc := dial()
			rc.handshake(ClientFlagFixedNewstyle)
			rc.write(optHeader(opt, 1<<30))
			if sent := stream(rc, 1<<30); sent >= 1<<30 {
				t.Errorf("%v: server read all of a 1 GiB name", opt)
			}
			rc.expectClosed()
		}
		checkGood("1 GiB name")
	})
	t.Run("request lengths 4 GiB and max+1", func(t *testing.T) {
		rc := dial()
		rc.open("disk", false)
		for _, n := range []uint32{0xffffffff, 32<<20 + 1} {
			rc.request(CmdRead, 0, 1, 0, n, nil)
			if e, _, _ := rc.simple(0); e != EINVAL {
				t.Errorf("read of %d: %v, want EINVAL", n, e)
			}
		}
		for _, n := range []uint32{0xffffffff, 32<<20 + 1} {
			rc := dial()
			rc.open("disk", false)
			rc.request(CmdWrite, 0, 1, 0, n, nil)
			if sent := stream(rc, int64(n)); sent >= int64(n) {
				t.Errorf("write of %d: server took the whole payload", n)
			}
			rc.expectClosed()
		}
		checkGood("huge requests")
	})
	t.Run("bad magic", func(t *testing.T) {
		rc := dial()
		rc.handshake(ClientFlagFixedNewstyle)
		rc.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		rc.expectClosed()
		rc = dial()
		rc.open("disk", false)
		rc.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		rc.expectClosed()
		checkGood("bad magic")
	})
	t.Run("option flood", func(t *testing.T) {
		rc := dial()
		rc.handshake(ClientFlagFixedNewstyle)
		flood := make([]byte, 0, 100000*16)
		for i := 0; i < 100000; i++ {
			flood = append(flood, optHeader(OptList, 0)...)
		}
		// The server replies to each LIST while the client does not read;
		// it closes after MaxOptions or at the handshake deadline.
		go rc.c.Write(flood)
		rc.expectClosed()
		rc = dial()
		rc.handshake(ClientFlagFixedNewstyle)
		// A new slice: the first flood's Write may still be running.
		unknown := make([]byte, 0, 10000*32)
		for i := 0; i < 10000; i++ {
			unknown = append(unknown, optBytes(Opt(1000+i), []byte("xxxxxxxxxxxxxxxx"))...)
		}
		go rc.c.Write(unknown)
		rc.expectClosed()
		checkGood("option flood")
	})
	t.Run("client stops mid-handshake", func(t *testing.T) {
		var rcs []*rawClient
		for i := 0; i < 3; i++ {
			rcs = append(rcs, dial())
		}
		rcs[1].read(18)
		rcs[2].handshake(ClientFlagFixedNewstyle)
		rcs[2].write(optHeader(OptGo, 100)[:10])
		if tlsCfg != nil {
			// Silent after the STARTTLS ACK: the TLS handshake is under
			// the negotiation deadline too.
			rc := dialRaw(t, sock)
			rc.handshake(ClientFlagFixedNewstyle)
			rc.sendOpt(OptStartTLS, nil)
			rc.expectRep(OptStartTLS, RepAck)
			rcs = append(rcs, rc)
		}
		start := time.Now()
		for _, rc := range rcs {
			rc.expectClosed()
		}
		if d := time.Since(start); d > 6*time.Second {
			t.Errorf("stalled handshakes closed after %v", d)
		}
		checkGood("stalled handshakes")
	})
	t.Run("1000 idle connections", func(t *testing.T) {
		var mu sync.Mutex
		var conns []net.Conn
		var wg sync.WaitGroup
		errs := make(chan error, 1000)
		for w := 0; w < 20; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 50; i++ {
					c, err := net.Dial("unix", sock)
					if err != nil {
						errs <- err
						return
					}
					c.SetDeadline(time.Now().Add(30 * time.Second))
					if c, err = idleHandshake(c, []string{"disk", ""}[i%2], tlsCfg); err != nil {
						errs <- err
						c.Close()
						return
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("idle connection: %v", err)
		}
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		if len(conns) != 1000 {
			t.Fatalf("%d idle connections", len(conns))
		}
		checkGood("1000 idle connections")
		rss := testenv.ProcStatus(t, pid, "VmRSS")
		t.Logf("server RSS with 1000 idle connections: %d KiB (+%d KiB)", rss>>10, (rss-base)>>10)
	})
	checkGood("everything")
	rss, hwm := testenv.ProcStatus(t, pid, "VmRSS"), testenv.ProcStatus(t, pid, "VmHWM")
	t.Logf("server RSS at end: %d KiB, peak %d KiB, start %d KiB", rss>>10, hwm>>10, base>>10)
	if hwm-base >= 64<<20 {
		t.Errorf("server RSS grew by %d MiB (peak), limit 64 MiB", (hwm-base)>>20)
	}
}

// idleHandshake negotiates with GO (no zeroes), over TLS if tlsCfg is
// set, and leaves the connection idle in transmission. It returns the
// connection to close: c, or the TLS session on it.
func idleHandshake(c net.Conn, name string, tlsCfg *tls.Config) (net.Conn, error) {
	br := bufio.NewReader(c)
	g := make([]byte, 18)
	if _, err := ioReadFull(br, g); err != nil {
		return c, err
	}
	msg := be32(uint32(ClientFlagFixedNewstyle | ClientFlagNoZeroes))
	if tlsCfg != nil {
		if _, err := c.Write(append(msg, optBytes(OptStartTLS, nil)...)); err != nil {
			return c, err
		}
		ack := make([]byte, 20)
		if _, err := ioReadFull(br, ack); err != nil {
			return c, err
		}
		if rep := Rep(binary.BigEndian.Uint32(ack[12:])); rep != RepAck {
			return c, errors.New("STARTTLS refused: " + rep.String())
		}
		tc := tls.Client(c, tlsCfg)
		if err := tc.Handshake(); err != nil {
			return c, err
		}
		c, br, msg = tc, bufio.NewReader(tc), nil
	}
	msg = append(msg, optBytes(OptGo, nameAndInfos(name))...)
	if _, err := c.Write(msg); err != nil {
		return c, err
	}
	for {
		h := make([]byte, 20)
		if _, err := ioReadFull(br, h); err != nil {
			return c, err
		}
		rep := Rep(binary.BigEndian.Uint32(h[12:]))
		if _, err := ioReadFull(br, make([]byte, binary.BigEndian.Uint32(h[16:]))); err != nil {
			return c, err
		}
		if rep == RepAck {
			return c, nil
		}
		if rep != RepInfo {
			return c, errors.New("GO refused: " + rep.String())
		}
	}
}
