package nbdsrv

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
)

// TLS, negotiated with NBD_OPT_STARTTLS during option haggling (the NBD
// project's doc/proto.md, "TLS support"). The server offers TLS only when
// Config.TLS is set; each listener then runs in one of the spec's modes:
//
//   - TLSOptional, the spec's SELECTIVETLS: a client may upgrade at any
//     point of the negotiation or stay in plain text; an export whose
//     Export.Allow refuses the plain client is TLS-only for it
//     (NBD_REP_ERR_TLS_REQD on INFO and GO, left out of LIST).
//   - TLSRequired, the spec's FORCEDTLS: until the upgrade every option but
//     STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD, and
//     NBD_OPT_EXPORT_NAME, which has no error reply, ends the connection.
//
// Without Config.TLS the server runs the spec's NOTLS mode: STARTTLS is
// answered NBD_REP_ERR_POLICY (the server supports TLS, its configuration
// does not offer it).
//
// The spec's rules kept here: STARTTLS carries no payload
// (NBD_REP_ERR_INVALID) and is refused once TLS runs (NBD_REP_ERR_INVALID
// again); TLS needs the fixed newstyle handshake, so a client that did not
// set NBD_FLAG_C_FIXED_NEWSTYLE is served in plain text only, and not at all
// on a TLSRequired listener; the TLS handshake runs under the negotiation's
// deadline (Config.HandshakeTimeout), and if it fails the connection is
// closed, as the ACK has been sent and there is no way back to plain text;
// nothing negotiated before the upgrade (structured replies, meta contexts)
// survives it; after NBD_CMD_DISC the TLS session is closed (close_notify)
// before the socket.

// TLSMode is how a listener's connections negotiate TLS (see ServeMode).
type TLSMode int

const (
	// TLSOptional serves plain sessions and accepts STARTTLS when
	// Config.TLS is set.
	TLSOptional TLSMode = iota
	// TLSRequired refuses everything but STARTTLS and ABORT until TLS
	// runs. It needs Config.TLS.
	TLSRequired
)

func (m TLSMode) String() string {
	switch m {
	case TLSOptional:
		return "optional"
	case TLSRequired:
		return "required"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// Peer is what the server knows of a connection's client, for
// Export.Allow.
type Peer struct {
	// LocalAddr is the server's end of the connection: its Network()
	// ("unix", "tcp") tells a local client from a remote one.
	LocalAddr, RemoteAddr net.Addr
	// TLS is the connection's TLS state once NBD_OPT_STARTTLS has
	// succeeded; nil before, and on a plain session.
	TLS *tls.ConnectionState
}

// Identities returns the names the client's certificate proves: the
// subject's common name, then the subject alternative names (DNS names,
// email addresses, URIs, IP addresses). It returns nil on a plain session
// and for a certificate the server did not verify (no verified chain):
// an unverified certificate says whatever its holder wrote into it.
func (p Peer) Identities() []string {
	if p.TLS == nil || len(p.TLS.VerifiedChains) == 0 || len(p.TLS.VerifiedChains[0]) == 0 {
		return nil
	}
	cert := p.TLS.VerifiedChains[0][0]
	var ids []string
	if cert.Subject.CommonName != "" {
		ids = append(ids, cert.Subject.CommonName)
	}
	ids = append(ids, cert.DNSNames...)
	ids = append(ids, cert.EmailAddresses...)
	for _, u := range cert.URIs {
		ids = append(ids, u.String())
	}
	for _, ip := range cert.IPAddresses {
		ids = append(ids, ip.String())
	}
	return ids
}

var (
	// errTLSHandshake marks a failed TLS handshake after STARTTLS was
	// acknowledged; the connection is closed.
	errTLSHandshake = errors.New("TLS handshake")
	// errHandshakePanic is the handshake's outcome when it panicked
	// (recoverPanic has logged it and aborted the connection).
	errHandshakePanic = errors.New("panic in the TLS handshake")
)

// tlsReadBuf is the read buffer of a connection once TLS runs, in place of
// connReadBuf: crypto/tls holds a whole decrypted record already, so a
// second large buffer would only make idle connections dearer (a busy one
// still grows to busyReadBuf).
const tlsReadBuf = 4 << 10

// optStartTLS answers NBD_OPT_STARTTLS and, once it has acknowledged it,
// runs the TLS handshake. An error ends the connection.
func (c *conn) optStartTLS(data []byte) error {
	switch {
	case len(data) != 0:
		return c.optReply(OptStartTLS, RepErrInvalid, []byte("payload not empty"))
	case c.tlsConn != nil:
		return c.optReply(OptStartTLS, RepErrInvalid, []byte("TLS already negotiated"))
	case c.s.cfg.TLS == nil:
		return c.optReply(OptStartTLS, RepErrPolicy, []byte("TLS not offered by this server"))
	case !c.fixedNewstyle:
		return c.optReply(OptStartTLS, RepErrPolicy, []byte("TLS needs the fixed newstyle handshake"))
	}
	if err := c.optReply(OptStartTLS, RepAck, nil); err != nil {
		return err
	}
	return c.startTLS()
}

// startTLS runs the server side of the TLS handshake on the connection
// and moves the negotiation onto it.
func (c *conn) startTLS() error {
	src := c.raw
	if n := c.br.Buffered(); n > 0 {
		// The client sent its first TLS bytes before it read the ACK;
		// they are in the plain-text read buffer, which is dropped below.
		// They go to the TLS layer, never back to the option parser.
		src = &prefixConn{Conn: c.raw, r: io.MultiReader(bytes.NewReader(bytes.Clone(c.br.Next(n))), c.raw)}
	}
	tc := tls.Server(src, c.s.cfg.TLS)
	// The handshake runs under the negotiation deadline set on raw; the
	// context only makes an abort end it at once. It runs on a goroutine
	// of its own because its cryptography grows a goroutine's stack to
	// 16 KiB or more, which the connection's goroutine would keep for the
	// life of the connection (a thousand idle TLS connections held 8 MiB
	// more that way); this one's stack goes back to the runtime.
	hs := make(chan error, 1)
	go func() {
		err := errHandshakePanic
		defer func() { hs <- err }()
		defer c.recoverPanic("TLS handshake")
		err = tc.HandshakeContext(c.ctx)
	}()
	if err := <-hs; err != nil {
		return fmt.Errorf("%w: %w", errTLSHandshake, err)
	}
	st := tc.ConnectionState()
	c.tlsConn, c.tlsState = tc, &st
	c.nc = tc
	c.br = newConnReader(tc, tlsReadBuf)
	// The spec: no negotiation state from before the upgrade survives it.
	c.structured, c.meta, c.metaExp = false, nil, nil
	c.log.Debug("nbd: TLS negotiated", "version", tls.VersionName(st.Version),
		"cipher", tls.CipherSuiteName(st.CipherSuite), "identities", c.peer().Identities())
	return nil
}

// endTLS sends the TLS close_notify alert, so that the client sees the
// session end cleanly rather than cut (the spec has the server close TLS
// before the socket after NBD_CMD_DISC). crypto/tls bounds the write to 5
// seconds for a client that no longer reads; an abort cuts it short.
func (c *conn) endTLS() {
	if c.tlsConn != nil {
		c.tlsConn.CloseWrite()
	}
}

// prefixConn is a net.Conn whose reads return r, which starts with bytes
// already taken from the connection.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// tlsRequired reports whether opt must be refused because this listener
// requires TLS and the client has not started it.
func (c *conn) tlsRequired(opt Opt) bool {
	return c.mode == TLSRequired && c.tlsConn == nil && opt != OptStartTLS && opt != OptAbort
}

// peer describes the client for Export.Allow.
func (c *conn) peer() Peer {
	return Peer{LocalAddr: c.raw.LocalAddr(), RemoteAddr: c.raw.RemoteAddr(), TLS: c.tlsState}
}

// allowed reports whether the client may see and use ex.
func (c *conn) allowed(ex *export) bool {
	return ex.Allow == nil || ex.Allow(c.peer())
}

// refuse answers an option naming an export the client may not use. INFO
// and GO get NBD_REP_ERR_TLS_REQD while TLS is on offer and not yet
// running, the spec's answer for a TLS-only export (with a certificate
// the client may be allowed); every other case, and every other option
// (the spec allows TLS_REQD on INFO and GO only), NBD_REP_ERR_POLICY.
// Refusals are logged rate-limited: a client can cause one per option.
func (c *conn) refuse(opt Opt, ex *export) error {
	p := c.peer()
	c.s.loglim.logf(c.ctx, c.log, slog.LevelWarn, ex.Name, "nbd: client not allowed on export",
		"export", ex.Name, "option", opt, "remote", p.RemoteAddr.String(), "tls", p.TLS != nil,
		"identities", p.Identities())
	if (opt == OptInfo || opt == OptGo) && c.tlsConn == nil && c.s.cfg.TLS != nil && c.fixedNewstyle {
		return c.optReply(opt, RepErrTLSReqd, []byte("TLS required for this export"))
	}
	return c.optReply(opt, RepErrPolicy, []byte("not allowed on this export"))
}
