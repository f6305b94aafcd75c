package nbdsrv

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/internal/tlstest"
)

// The fuzz targets feed arbitrary bytes through net.Pipe (or a socket pair,
// for TLS) into a server with a memory backend and check: no panic (a
// recovered one is logged and fails the input), no hang (the connection
// ends within seconds of the client closing), and bounded allocation per
// input. FuzzStartTLS runs a real TLS client in the middle of the
// negotiation, so that the bytes after STARTTLS are fuzzed over TLS.

const fuzzAllocLimit = 64 << 20

func optBytes(opt Opt, data []byte) []byte {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b, magicIHaveOpt)
	binary.BigEndian.PutUint32(b[8:], uint32(opt))
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	return append(b, data...)
}

func reqBytes(cmd Cmd, flags CmdFlags, cookie, off uint64, length uint32, payload []byte) []byte {
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], uint16(flags))
	binary.BigEndian.PutUint16(b[6:], uint16(cmd))
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// fuzzServer is the server every fuzz target talks to: a writable export
// "a" (the default) with a dirty bitmap, a read-only one "ro" with its own
// block sizes, and "secret", which only alice may use.
func fuzzServer(t *testing.T, logs io.Writer, tlsCfg *tls.Config) *Server {
	s := NewServer(Config{
		Logger:             newTestLogger(logs),
		MaxRequestsPerConn: 8,
		MaxBytesPerConn:    4 << 20,
		HandshakeTimeout:   5 * time.Second,
		TLS:                tlsCfg,
	})
	m := newMem(1 << 20)
	m.setExtents([]Extent{{4096, 0}, {65536, ExtentHole | ExtentZero}, {1<<20 - 69632, 0}})
	for _, e := range []Export{
		{Name: "a", Size: 1 << 20, Backend: m, MetaContexts: changingContexts()},
		{Name: "ro", Size: 1<<20 + 100, Backend: readOnlyMem{m}, MinBlock: 512, MaxBlock: 64 << 10},
		{Name: "secret", Size: 1 << 20, Backend: m, Allow: allowAlice},
	} {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	s.SetDefaultExport("a")
	return s
}

// changingContexts is the fuzz export's context list: it changes at every
// call, as the daemon's does when snapshots come and go, between one dirty
// bitmap and a longer list with a second bitmap (which fails once off the
// list) and names the server must skip.
func changingContexts() func() []MetaContext {
	x := staticContext{name: "qemu:dirty-bitmap:x", exts: []Extent{{1 << 19, 1}, {1 << 19, 0}}}
	var mu sync.Mutex
	calls := 0
	var y *droppable
	return func() []MetaContext {
		mu.Lock()
		defer mu.Unlock()
		if y != nil {
			y.dropped.Store(true)
		}
		if calls++; calls%2 == 1 {
			return []MetaContext{x}
		}
		y = &droppable{staticContext: staticContext{name: "qemu:dirty-bitmap:y", exts: []Extent{{4096, 0}, {1<<20 - 4096, 1}}}}
		return []MetaContext{y, x, staticContext{name: "nocolon"}, staticContext{name: "base:allocation"}, x}
	}
}

// fuzzCheck serves one connection, srv, in mode while client drives the
// other end, and fails the input if the connection does not end within
// seconds of client returning (client closes its end), if it allocated
// more than fuzzAllocLimit, or if a connection goroutine panicked.
func fuzzCheck(t *testing.T, tlsCfg *tls.Config, mode TLSMode, srv net.Conn, client func()) {
	logs := &testenv.SyncBuffer{}
	s := fuzzServer(t, logs, tlsCfg)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	done := make(chan struct{})
	go func() {
		s.serveConn(srv, mode)
		close(done)
	}()
	client()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("connection did not end after the client closed")
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > fuzzAllocLimit {
		t.Fatalf("input allocated %d bytes", d)
	}
	if contains(logs.String(), "nbd: panic") {
		t.Fatalf("panic:\n%s", logs.String())
	}
}

// fuzzServe runs one plain connection over the given client bytes.
func fuzzServe(t *testing.T, input []byte) {
	cli, srv := net.Pipe()
	fuzzCheck(t, nil, TLSOptional, srv, func() {
		go io.Copy(io.Discard, cli)
		cli.SetDeadline(time.Now().Add(10 * time.Second))
		cli.Write(input) // an error means the server closed: fine
		cli.Close()
	})
}

// socketPair returns the two ends of a unix stream socket pair. The TLS
// fuzz target needs the kernel's buffering: over net.Pipe a TLS alert
// written while the client is busy writing would wait for the deadline.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return conns[0], conns[1]
}

// fuzzServeTLS runs one connection in two halves: in plain text the
// client flags, before (arbitrary options) and NBD_OPT_STARTTLS; then, if
// the server acknowledged a STARTTLS, a real TLS client completes the
// handshake and sends after over the session. mode picks the listener's
// TLS mode (bit 0), the client's certificate (bits 1-2: alice, bob, none,
// or one from another CA), and the client flags (bit 3: no NO_ZEROES, bit
// 4: no FIXED_NEWSTYLE).
func fuzzServeTLS(t *testing.T, pki *tlstest.PKI, mode byte, before, after []byte) {
	tlsMode := TLSOptional
	if mode&1 != 0 {
		tlsMode = TLSRequired
	}
	cert := []*tlstest.Cert{&pki.Alice, &pki.Bob, nil, &pki.Mallory}[mode>>1&3]
	flags := ClientFlagFixedNewstyle | ClientFlagNoZeroes
	if mode&8 != 0 {
		flags &^= ClientFlagNoZeroes
	}
	if mode&16 != 0 {
		flags &^= ClientFlagFixedNewstyle
	}
	cli, srv := socketPair(t)
	fuzzCheck(t, pki.ServerConfig(tls.VerifyClientCertIfGiven), tlsMode, srv, func() {
		defer cli.Close()
		cli.SetDeadline(time.Now().Add(10 * time.Second))
		written := make(chan struct{})
		go func() {
			cli.Write(cat(be32(uint32(flags)), before, optBytes(OptStartTLS, nil)))
			close(written)
		}()
		br := bufio.NewReader(cli)
		var rest io.Reader = br // what the server sends after the plain part
		// Unless before is whole options, the server cannot take the
		// STARTTLS for one, and waiting for its reply would only wait for
		// the handshake deadline.
		if n, ok := startTLSCount(before); ok && awaitStartTLS(br, n+1) {
			// The rest of the plain bytes, if any, reach the server's TLS
			// layer before the ClientHello, as they would from a real
			// client that pipelined them.
			<-written
			tc := tls.Client(&prefixConn{Conn: cli, r: br}, pki.ClientConfig(cert))
			if tc.Handshake() == nil {
				rest = tc
				written = make(chan struct{})
				go func() {
					tc.Write(after)
					tc.CloseWrite()
					close(written)
				}()
			}
		}
		// The client ends by closing its sending side and reading until
		// the server, having answered everything, closes: closing at once
		// would cut the server off at its first reply.
		go func(written <-chan struct{}) {
			<-written
			cli.(*net.UnixConn).CloseWrite()
		}(written)
		io.Copy(io.Discard, rest)
	})
}

// startTLSCount reports whether b is a sequence of whole options, and how
// many of them are STARTTLS.
func startTLSCount(b []byte) (int, bool) {
	n := 0
	for len(b) > 0 {
		if len(b) < 16 || binary.BigEndian.Uint64(b) != magicIHaveOpt || uint64(binary.BigEndian.Uint32(b[12:])) > uint64(len(b)-16) {
			return 0, false
		}
		if Opt(binary.BigEndian.Uint32(b[8:])) == OptStartTLS {
			n++
		}
		b = b[16+binary.BigEndian.Uint32(b[12:]):]
	}
	return n, true
}

// awaitStartTLS reads the greeting and option replies until the server
// acknowledges a STARTTLS (true), or refused all n of them, or the stream
// ends or stops looking like option replies (false). Every STARTTLS gets
// exactly one reply.
func awaitStartTLS(br *bufio.Reader, n int) bool {
	if _, err := br.Discard(18); err != nil {
		return false
	}
	var h [optReplyHeaderLen]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil || binary.BigEndian.Uint64(h[:]) != magicOptReply {
			return false
		}
		if Opt(binary.BigEndian.Uint32(h[8:])) == OptStartTLS {
			if Rep(binary.BigEndian.Uint32(h[12:])) == RepAck {
				return true
			}
			if n--; n == 0 {
				return false
			}
		}
		if _, err := br.Discard(int(binary.BigEndian.Uint32(h[16:]))); err != nil {
			return false
		}
	}
}

var clientFlags = []byte{0, 0, 0, 3}

func FuzzOptions(f *testing.F) {
	f.Add(cat(clientFlags, optBytes(OptGo, nameAndInfos("a", InfoName, InfoBlockSize))))
	f.Add(cat(clientFlags, optBytes(OptList, nil), optBytes(OptInfo, nameAndInfos("ro", InfoDescription)), optBytes(OptAbort, nil)))
	f.Add(cat(clientFlags, optBytes(OptStructuredReply, nil), optBytes(OptListMetaContext, metaPayload("a")),
		optBytes(OptSetMetaContext, metaPayload("a", "base:allocation", "qemu:dirty-bitmap:x")), optBytes(OptGo, nameAndInfos(""))))
	f.Add(cat(clientFlags, optBytes(OptExportName, []byte("a"))))
	f.Add(cat(clientFlags, optBytes(99, []byte("junk")), optBytes(OptStartTLS, nil)))
	f.Add(cat(clientFlags, optBytes(OptListMetaContext, append(append(be32(1), 'a'), be32(0xffffffff)...))))
	f.Add(cat([]byte{0, 0, 0, 0}, optBytes(OptExportName, nil)))
	f.Fuzz(func(t *testing.T, input []byte) { fuzzServe(t, input) })
}

func FuzzStartTLS(f *testing.F) {
	pki := tlstest.New(f)
	goSecret := optBytes(OptGo, nameAndInfos("secret", InfoName, InfoDescription))
	f.Add(byte(0), []byte(nil), cat(goSecret, reqBytes(CmdRead, 0, 1, 0, 4096, nil), reqBytes(CmdDisc, 0, 2, 0, 0, nil)))
	f.Add(byte(1), optBytes(OptList, nil), cat(optBytes(OptList, nil), optBytes(OptStructuredReply, nil),
		optBytes(OptSetMetaContext, metaPayload("secret", "base:allocation")), goSecret,
		reqBytes(CmdBlockStatus, 0, 1, 0, 1<<20, nil)))
	f.Add(byte(2), cat(optBytes(OptStructuredReply, nil), optBytes(OptStartTLS, []byte("x"))),
		cat(optBytes(OptStartTLS, nil), optBytes(OptInfo, nameAndInfos("secret")), optBytes(OptExportName, []byte("secret"))))
	f.Add(byte(3), optBytes(OptGo, nameAndInfos("a")), optBytes(OptAbort, nil))
	f.Add(byte(4), optBytes(OptStartTLS, nil), optBytes(OptGo, nameAndInfos("")))
	f.Add(byte(6), optBytes(OptExportName, []byte("a")), []byte(nil))
	f.Add(byte(9), []byte(nil), cat(optBytes(OptExportName, []byte("a")), reqBytes(CmdWrite, FlagFUA, 1, 0, 4, []byte("abcd"))))
	f.Add(byte(17), optBytes(OptInfo, nameAndInfos("secret")), optBytes(OptList, nil))
	f.Fuzz(func(t *testing.T, mode byte, before, after []byte) { fuzzServeTLS(t, pki, mode, before, after) })
}

func FuzzTransmission(f *testing.F) {
	f.Add(byte(1), cat(reqBytes(CmdWrite, FlagFUA, 1, 0, 4, []byte("abcd")), reqBytes(CmdRead, FlagDF, 2, 0, 4096, nil)))
	f.Add(byte(1), cat(reqBytes(CmdBlockStatus, 0, 1, 0, 1<<20, nil), reqBytes(CmdBlockStatus, FlagReqOne, 2, 100, 100, nil)))
	f.Add(byte(0), cat(reqBytes(CmdTrim, 0, 1, 0, 4096, nil), reqBytes(CmdWriteZeroes, FlagNoHole|FlagFastZero, 2, 0, 1<<20, nil),
		reqBytes(CmdFlush, 0, 3, 0, 0, nil), reqBytes(CmdCache, 0, 4, 0, 10, nil)))
	f.Add(byte(2), cat(reqBytes(CmdWrite, 0, 1, 0, 512, make([]byte, 512)), reqBytes(CmdRead, 0, 2, 1<<20, 100, nil)))
	f.Add(byte(0), cat(reqBytes(CmdRead, 0, 1, 0, 0xffffffff, nil), reqBytes(CmdWrite, 0, 2, 0, 0xffffffff, nil)))
	f.Add(byte(1), cat(reqBytes(77, 0xffff, 1, 0, 1, nil), reqBytes(CmdDisc, 0, 2, 0, 0, nil)))
	f.Fuzz(func(t *testing.T, mode byte, input []byte) {
		// mode picks the negotiation: simple or structured replies, and
		// the writable or the read-only export.
		prefix := clientFlags
		if mode&1 != 0 {
			prefix = cat(prefix, optBytes(OptStructuredReply, nil),
				optBytes(OptSetMetaContext, metaPayload("a", "base:allocation", "qemu:dirty-bitmap:x")))
		}
		name := "a"
		if mode&2 != 0 {
			name = "ro"
		}
		fuzzServe(t, cat(prefix, optBytes(OptGo, nameAndInfos(name)), input))
	})
}
