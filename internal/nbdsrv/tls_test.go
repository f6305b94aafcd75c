package nbdsrv

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/tlstest"
)

// startTLS sends NBD_OPT_STARTTLS, expects the ACK and runs the client
// side of the TLS handshake; the client then speaks over TLS.
func (rc *rawClient) startTLS(cfg *tls.Config) {
	rc.t.Helper()
	rc.sendOpt(OptStartTLS, nil)
	rc.expectRep(OptStartTLS, RepAck)
	tc := tls.Client(rc.c, cfg)
	if err := tc.Handshake(); err != nil {
		rc.t.Fatalf("TLS handshake: %v", err)
	}
	rc.c, rc.br = tc, bufio.NewReader(tc)
}

// listNames sends NBD_OPT_LIST and returns the export names.
func (rc *rawClient) listNames() []string {
	rc.t.Helper()
	rc.sendOpt(OptList, nil)
	var names []string
	for {
		r := rc.readOptReply()
		switch r.rep {
		case RepAck:
			return names
		case RepServer:
			names = append(names, string(r.data[4:4+binary.BigEndian.Uint32(r.data)]))
		default:
			rc.t.Fatalf("LIST: %v %q", r.rep, r.data)
		}
	}
}

// listenMode serves ts's server on a further unix socket in mode and
// returns its address.
func listenMode(t *testing.T, ts *testServer, mode TLSMode) string {
	t.Helper()
	addr := filepath.Join(shortTempDir(t), "m.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ts.ServeMode(l, mode) }()
	t.Cleanup(func() {
		// Runs before startServer's cleanup, whose Shutdown then finds
		// nothing left to do.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ts.Shutdown(ctx)
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("ServeMode returned %v, want ErrServerClosed", err)
		}
	})
	return addr
}

func allowAlice(p Peer) bool { return slices.Contains(p.Identities(), "alice") }

// tlsExports: "open" for everyone, "secret" for alice only.
func tlsExports(m *memBackend) []Export {
	return []Export{
		{Name: "open", Size: 1 << 20, Backend: m},
		{Name: "secret", Size: 1 << 20, Backend: m, Allow: allowAlice},
	}
}

// readBack writes through the open connection and reads it back
// (simple replies).
func readBack(t *testing.T, rc *rawClient) {
	t.Helper()
	want := pattern(4096, 7)
	rc.request(CmdWrite, 0, 1, 0, 4096, want)
	if e, _, _ := rc.simple(0); e != 0 {
		t.Fatalf("write: %v", e)
	}
	rc.request(CmdRead, 0, 2, 0, 4096, nil)
	if e, _, got := rc.simple(4096); e != 0 || string(got) != string(want) {
		t.Fatalf("read back: %v", e)
	}
}

// TestTLSOptional: a listener where TLS is on offer (the spec's
// SELECTIVETLS): a plain client sees only what Allow grants it, and is told
// NBD_REP_ERR_TLS_REQD for a TLS-only export; a client that upgrades sees
// what its certificate allows, the rest refused with NBD_REP_ERR_POLICY.
func TestTLSOptional(t *testing.T) {
	pki := tlstest.New(t)
	m := newMem(1 << 20)
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.VerifyClientCertIfGiven)}, tlsExports(m)...)
	ts.SetDefaultExport("open")

	t.Run("plain", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		if got := rc.listNames(); !slices.Equal(got, []string{"open"}) {
			t.Errorf("LIST: %q, want only open", got)
		}
		rc.sendOpt(OptInfo, nameAndInfos("secret"))
		rc.expectRep(OptInfo, RepErrTLSReqd)
		rc.sendOpt(OptStructuredReply, nil)
		rc.expectRep(OptStructuredReply, RepAck)
		// The spec allows TLS_REQD only on INFO and GO.
		if _, rep := rc.listMeta("secret"); rep != RepErrPolicy {
			t.Errorf("LIST_META_CONTEXT secret: %v, want POLICY", rep)
		}
		rc.sendOpt(OptStartTLS, []byte{1})
		rc.expectRep(OptStartTLS, RepErrInvalid)
		rc.sendOpt(OptGo, nameAndInfos("secret"))
		rc.expectRep(OptGo, RepErrTLSReqd)
		if ei := rc.info(OptGo, "open"); ei.size != 1<<20 {
			t.Fatalf("GO open: %+v", ei)
		}
	})
	t.Run("alice", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		rc.sendOpt(OptStructuredReply, nil) // forgotten by STARTTLS
		rc.expectRep(OptStructuredReply, RepAck)
		rc.startTLS(pki.ClientConfig(&pki.Alice))
		if got := rc.listNames(); !slices.Equal(got, []string{"open", "secret"}) {
			t.Errorf("LIST: %q, want both", got)
		}
		rc.sendOpt(OptStartTLS, nil)
		rc.expectRep(OptStartTLS, RepErrInvalid)
		ei := rc.info(OptGo, "secret")
		if ei.flags&FlagSendDF != 0 {
			t.Errorf("structured replies survived STARTTLS: flags %v", ei.flags)
		}
		readBack(t, rc) // simple replies, for the same reason
	})
	for _, tc := range []struct {
		name string
		cert *tlstest.Cert
	}{{"bob", &pki.Bob}, {"no certificate", nil}} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, ts.addr)
			rc.tls = pki.ClientConfig(tc.cert)
			rc.handshake(ClientFlagFixedNewstyle)
			if got := rc.listNames(); !slices.Equal(got, []string{"open"}) {
				t.Errorf("LIST: %q, want only open", got)
			}
			for _, opt := range []Opt{OptInfo, OptGo} {
				rc.sendOpt(opt, nameAndInfos("secret"))
				rc.expectRep(opt, RepErrPolicy)
			}
			rc.sendOpt(OptGo, nameAndInfos("", InfoName))
			rc.expectRep(OptGo, RepInfo) // the default export is open
		})
	}
	t.Run("no fixed newstyle", func(t *testing.T) {
		// The spec: without FIXED_NEWSTYLE the server runs NOTLS.
		rc := dialRaw(t, ts.addr)
		rc.handshake(0)
		rc.sendOpt(OptStartTLS, nil)
		rc.expectRep(OptStartTLS, RepErrPolicy)
		rc.sendOpt(OptInfo, nameAndInfos("secret"))
		rc.expectRep(OptInfo, RepErrPolicy)
	})
	waitLog(t, ts, "nbd: client not allowed on export")
}

// TestTLSRequired: on a TLSRequired listener (the spec's FORCEDTLS) every
// option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD before TLS, and
// none after; EXPORT_NAME before TLS and a client without FIXED_NEWSTYLE
// are closed. The same server's other listener still serves plain clients.
func TestTLSRequired(t *testing.T) {
	pki := tlstest.New(t)
	m := newMem(1 << 20)
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.RequireAndVerifyClientCert)}, tlsExports(m)...)
	ts.SetDefaultExport("open")
	addr := listenMode(t, ts, TLSRequired)

	t.Run("plain", func(t *testing.T) {
		rc := dialRaw(t, addr)
		rc.handshake(ClientFlagFixedNewstyle)
		for _, o := range []struct {
			opt  Opt
			data []byte
		}{
			{OptList, nil}, {OptInfo, nameAndInfos("open")}, {OptGo, nameAndInfos("open")},
			{OptInfo, nameAndInfos("nope")}, {OptStructuredReply, nil}, {OptListMetaContext, metaPayload("open")},
			{OptSetMetaContext, metaPayload("open", "base:allocation")}, {OptPeekExport, nil}, {99, []byte("junk")},
		} {
			rc.sendOpt(o.opt, o.data)
			rc.expectRep(o.opt, RepErrTLSReqd)
		}
		rc.sendOpt(OptAbort, nil)
		rc.expectRep(OptAbort, RepAck)
		rc.expectClosed()
	})
	t.Run("EXPORT_NAME before TLS", func(t *testing.T) {
		rc := dialRaw(t, addr)
		rc.handshake(ClientFlagFixedNewstyle)
		rc.sendOpt(OptExportName, []byte("open"))
		rc.expectClosed()
		waitLog(t, ts, "before TLS on a listener that requires it")
	})
	t.Run("no fixed newstyle", func(t *testing.T) {
		rc := dialRaw(t, addr)
		rc.handshake(0)
		rc.expectClosed()
		waitLog(t, ts, "lack FIXED_NEWSTYLE")
	})
	t.Run("alice", func(t *testing.T) {
		rc := dialRaw(t, addr)
		rc.tls = pki.ClientConfig(&pki.Alice)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		rc.sendOpt(99, nil)
		rc.expectRep(99, RepErrUnsup)
		if got := rc.listNames(); !slices.Equal(got, []string{"open", "secret"}) {
			t.Errorf("LIST: %q", got)
		}
		rc.info(OptGo, "secret")
		readBack(t, rc)
		// EXPORT_NAME works once TLS runs.
		rc = dialRaw(t, addr)
		rc.tls = pki.ClientConfig(&pki.Alice)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		rc.sendOpt(OptExportName, []byte("secret"))
		if size := binary.BigEndian.Uint64(rc.read(10)); size != 1<<20 {
			t.Errorf("EXPORT_NAME: size %d", size)
		}
		readBack(t, rc)
	})
	t.Run("bob", func(t *testing.T) {
		rc := dialRaw(t, addr)
		rc.tls = pki.ClientConfig(&pki.Bob)
		rc.handshake(ClientFlagFixedNewstyle)
		if got := rc.listNames(); !slices.Equal(got, []string{"open"}) {
			t.Errorf("LIST: %q", got)
		}
		rc.sendOpt(OptGo, nameAndInfos("secret"))
		rc.expectRep(OptGo, RepErrPolicy)
		rc.sendOpt(OptExportName, []byte("secret"))
		rc.expectClosed()
	})
	t.Run("plain listener", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.open("open", false)
		readBack(t, rc)
	})
}

// TestTLSHandshakeFailure: a client the TLS handshake refuses (no
// certificate, one from another CA, not TLS at all, silent) is
// disconnected, within the handshake timeout, and logged.
func TestTLSHandshakeFailure(t *testing.T) {
	pki := tlstest.New(t)
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.RequireAndVerifyClientCert), HandshakeTimeout: 500 * time.Millisecond},
		tlsExports(newMem(1<<20))...)
	for _, tc := range []struct {
		name string
		cert *tlstest.Cert
	}{{"no certificate", nil}, {"untrusted", &pki.Mallory}} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, ts.addr)
			rc.handshake(ClientFlagFixedNewstyle)
			rc.sendOpt(OptStartTLS, nil)
			rc.expectRep(OptStartTLS, RepAck)
			// With TLS 1.3 the client learns of the refusal on its first
			// read, not in its handshake.
			tc := tls.Client(rc.c, pki.ClientConfig(tc.cert))
			if err := tc.Handshake(); err == nil {
				if _, err := tc.Read(make([]byte, 1)); err == nil {
					t.Fatal("the server accepted the session")
				}
			}
		})
	}
	t.Run("not TLS", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle)
		rc.sendOpt(OptStartTLS, nil)
		rc.expectRep(OptStartTLS, RepAck)
		rc.sendOpt(OptList, nil) // plain text after the ACK
		rc.expectClosed()
	})
	t.Run("silent", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle)
		rc.sendOpt(OptStartTLS, nil)
		rc.expectRep(OptStartTLS, RepAck)
		start := time.Now()
		rc.expectClosed()
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("closed after %v", d)
		}
		waitLog(t, ts, "handshake timed out")
	})
	waitLog(t, ts, "didn't provide a certificate")
	waitLog(t, ts, "certificate signed by unknown authority")
}

// TestTLSNotOffered: without Config.TLS, STARTTLS is refused by policy and
// a listener cannot require TLS.
func TestTLSNotOffered(t *testing.T) {
	ts := startServer(t, Config{}, tlsExports(newMem(1<<20))...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptStartTLS, nil)
	rc.expectRep(OptStartTLS, RepErrPolicy)
	rc.sendOpt(OptStartTLS, []byte("x"))
	rc.expectRep(OptStartTLS, RepErrInvalid)
	// Allow still applies: the plain client is not alice, and TLS_REQD
	// would be a lie.
	rc.sendOpt(OptGo, nameAndInfos("secret"))
	rc.expectRep(OptGo, RepErrPolicy)
	rc.info(OptGo, "open")
	readBack(t, rc)

	l, err := net.Listen("unix", filepath.Join(shortTempDir(t), "r.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := ts.ServeMode(l, TLSRequired); err == nil || !contains(err.Error(), "Config.TLS is not set") {
		t.Errorf("ServeMode(TLSRequired) without Config.TLS: %v", err)
	}
}

// pipelinedConn is a client connection that sends STARTTLS together with
// the ClientHello, and takes the ACK off the front of what it reads.
type pipelinedConn struct {
	net.Conn
	t           *testing.T
	br          *bufio.Reader
	sent, acked bool
}

func (p *pipelinedConn) Write(b []byte) (int, error) {
	if p.sent {
		return p.Conn.Write(b)
	}
	p.sent = true
	_, err := p.Conn.Write(append(optBytes(OptStartTLS, nil), b...))
	return len(b), err
}

func (p *pipelinedConn) Read(b []byte) (int, error) {
	if !p.acked {
		p.acked = true
		h := make([]byte, 20)
		if _, err := io.ReadFull(p.br, h); err != nil {
			return 0, err
		}
		if rep := Rep(binary.BigEndian.Uint32(h[12:])); rep != RepAck {
			p.t.Errorf("STARTTLS: %v", rep)
		}
	}
	return p.br.Read(b)
}

// TestTLSPipelinedClientHello: a client that sends its ClientHello right
// behind STARTTLS, without waiting for the ACK, gets its session: the bytes
// the option reader already buffered go to the TLS layer.
func TestTLSPipelinedClientHello(t *testing.T) {
	pki := tlstest.New(t)
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.RequireAndVerifyClientCert)}, tlsExports(newMem(1<<20))...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	tc := tls.Client(&pipelinedConn{Conn: rc.c, t: t, br: rc.br}, pki.ClientConfig(&pki.Alice))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	rc.c, rc.br = tc, bufio.NewReader(tc)
	rc.info(OptGo, "secret")
	readBack(t, rc)
}

// countingConn counts the bytes read from a connection.
type countingConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// TestTLSCloseNotify: after NBD_CMD_DISC the server ends the TLS session
// (a close_notify record) before it closes the socket, as the spec asks.
func TestTLSCloseNotify(t *testing.T) {
	pki := tlstest.New(t)
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.RequireAndVerifyClientCert)}, tlsExports(newMem(1<<20))...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	rc.sendOpt(OptStartTLS, nil)
	rc.expectRep(OptStartTLS, RepAck)
	cc := &countingConn{Conn: rc.c}
	tc := tls.Client(cc, pki.ClientConfig(&pki.Alice))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	rc.c, rc.br = tc, bufio.NewReader(tc)
	rc.info(OptGo, "open")
	readBack(t, rc)
	before := cc.n.Load()
	rc.request(CmdDisc, 0, 3, 0, 0, nil)
	if _, err := io.Copy(io.Discard, rc.br); err != nil {
		t.Fatalf("after DISC: %v, want a clean end of the TLS session", err)
	}
	if cc.n.Load() == before {
		t.Error("the server closed the socket without a close_notify")
	}
}

// TestPeerIdentities: the identities of a verified certificate are its CN
// and every SAN; an unverified one proves nothing.
func TestPeerIdentities(t *testing.T) {
	pki := tlstest.New(t)
	leaf, err := x509.ParseCertificate(pki.Alice.Certificate.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	p := Peer{TLS: &tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}, VerifiedChains: [][]*x509.Certificate{{leaf}}}}
	want := []string{"alice", "alice.example", "alice@example.com", "spiffe://example.org/alice", "192.0.2.1"}
	if got := p.Identities(); !slices.Equal(got, want) {
		t.Errorf("verified: %q, want %q", got, want)
	}
	p.TLS.VerifiedChains = nil
	if got := p.Identities(); got != nil {
		t.Errorf("unverified: %q, want none", got)
	}
	if got := (Peer{}).Identities(); got != nil {
		t.Errorf("plain: %q, want none", got)
	}
}

// Over TLS, replies are copied together into writes of up to flatMax
// (writeTLS): a pipelined burst of reads of every size around that bound,
// structured and simple, comes back whole and in step.
func TestTLSRepliesCoalesced(t *testing.T) {
	pki := tlstest.New(t)
	const size = 4 << 20
	m := newMem(size)
	copy(m.data, pattern(size, 5))
	ts := startServer(t, Config{TLS: pki.ServerConfig(tls.VerifyClientCertIfGiven)}, Export{Name: "a", Size: size, Backend: m})
	lengths := []uint32{1, 512, 4096, flatMax - 16, flatMax, flatMax + 1, 3 * flatMax, readChunk + 7}
	for _, structured := range []bool{false, true} {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		rc.startTLS(pki.ClientConfig(&pki.Alice))
		if structured {
			rc.sendOpt(OptStructuredReply, nil)
			rc.expectRep(OptStructuredReply, RepAck)
		}
		rc.info(OptGo, "a")
		for i, n := range lengths {
			rc.request(CmdRead, 0, uint64(i), uint64(i)*4096, n, nil)
		}
		got := map[uint64][]byte{}
		for done := 0; done < len(lengths); {
			if !structured {
				h := rc.read(16)
				cookie := binary.BigEndian.Uint64(h[8:])
				if e := binary.BigEndian.Uint32(h[4:]); e != 0 || cookie >= uint64(len(lengths)) {
					t.Fatalf("simple reply: errno %d cookie %d", e, cookie)
				}
				got[cookie] = rc.read(int(lengths[cookie]))
				done++
				continue
			}
			c := rc.chunk()
			switch c.typ {
			case ReplyOffsetData:
				got[c.cookie] = append(got[c.cookie], c.payload[8:]...)
			case ReplyOffsetHole:
			case ReplyNone:
			default:
				t.Fatalf("chunk %v", c.typ)
			}
			if c.flags&replyFlagDone != 0 {
				done++
			}
		}
		for i, n := range lengths {
			if want := m.bytesAt(i*4096, int(n)); string(got[uint64(i)]) != string(want) {
				t.Fatalf("structured %v: read %d of %d bytes differs", structured, i, n)
			}
		}
	}
}
