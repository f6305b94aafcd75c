package daemon

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/tlstest"
)

// optClient is an NBD client that stops at option haggling: enough to see
// which export a connection may use, and with what reply it is refused.
type optClient struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

const magicIHaveOpt = 0x49484156454f5054

// dialOpt connects and answers the greeting with FIXED_NEWSTYLE | NO_ZEROES.
func dialOpt(t *testing.T, network, addr string) *optClient {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	o := &optClient{t: t, c: c, br: bufio.NewReader(c)}
	if _, err := io.ReadFull(o.br, make([]byte, 18)); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	o.write(binary.BigEndian.AppendUint32(nil, uint32(nbdsrv.ClientFlagFixedNewstyle|nbdsrv.ClientFlagNoZeroes)))
	return o
}

func (o *optClient) write(b []byte) {
	o.t.Helper()
	if _, err := o.c.Write(b); err != nil {
		o.t.Fatalf("write: %v", err)
	}
}

func (o *optClient) send(opt nbdsrv.Opt, data []byte) {
	o.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, uint32(opt))
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	o.write(append(b, data...))
}

// reply reads one option reply; ok is false if the server closed.
func (o *optClient) reply() (rep nbdsrv.Rep, data []byte, ok bool) {
	h := make([]byte, 20)
	if _, err := io.ReadFull(o.br, h); err != nil {
		return 0, nil, false
	}
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(o.br, data); err != nil {
		return 0, nil, false
	}
	return nbdsrv.Rep(binary.BigEndian.Uint32(h[12:])), data, true
}

// startTLS upgrades the connection; it reports whether the session works
// (with TLS 1.3 a refused client certificate shows on the first read, so
// the caller's next reply tells).
func (o *optClient) startTLS(cfg *tls.Config) bool {
	o.t.Helper()
	o.send(nbdsrv.OptStartTLS, nil)
	if rep, _, ok := o.reply(); !ok || rep != nbdsrv.RepAck {
		o.t.Fatalf("STARTTLS: %v", rep)
	}
	tc := tls.Client(o.c, cfg)
	if err := tc.Handshake(); err != nil {
		return false
	}
	o.c, o.br = tc, bufio.NewReader(tc)
	return true
}

// info sends NBD_OPT_INFO for name, asking for the description, and
// returns the final reply and the description.
func (o *optClient) info(name string) (nbdsrv.Rep, string) {
	o.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, uint16(nbdsrv.InfoDescription))
	o.send(nbdsrv.OptInfo, b)
	var desc string
	for {
		rep, data, ok := o.reply()
		if !ok {
			return 0, ""
		}
		if rep != nbdsrv.RepInfo {
			return rep, desc
		}
		if nbdsrv.InfoType(binary.BigEndian.Uint16(data)) == nbdsrv.InfoDescription {
			desc = string(data[2:])
		}
	}
}

// list sends NBD_OPT_LIST and returns the names, or the error reply.
func (o *optClient) list() ([]string, nbdsrv.Rep) {
	o.t.Helper()
	o.send(nbdsrv.OptList, nil)
	var names []string
	for {
		rep, data, ok := o.reply()
		switch {
		case !ok:
			return names, 0
		case rep == nbdsrv.RepServer:
			names = append(names, string(data[4:4+binary.BigEndian.Uint32(data)]))
		default:
			return names, rep
		}
	}
}

// tlsEnv is an environment with the server's certificate files written.
func tlsEnv(t *testing.T, pki *tlstest.PKI) (env, TLSConfig) {
	e := newEnv(t, 1<<20)
	cert, key, ca := pki.WriteServerFiles(t, e.dir)
	return e, TLSConfig{CertFile: cert, KeyFile: key, CAFile: ca}
}

// TestTLSListeners: --tls=require with a CA and allow-lists. On TCP a
// plain client is told to start TLS, a TLS client sees and uses exactly
// the exports its certificate is listed for (the others refused with
// NBD_REP_ERR_POLICY and left out of LIST), a client without a valid
// certificate is disconnected; on the unix socket everyone gets
// everything, in plain text or TLS. No description names a path.
func TestTLSListeners(t *testing.T) {
	pki := tlstest.New(t)
	e, tc := tlsEnv(t, pki)
	tc.AllowOrigin = []string{"alice@example.com"} // a SAN
	tc.AllowSnapshots = []string{"bob"}            // a CN
	cfg := e.config()
	cfg.Listen = []string{"unix:" + e.sock, "tcp:127.0.0.1:0"}
	cfg.TLS = tc
	d := start(t, cfg)
	if _, err := control.NewClient(e.ctl).Create(context.Background(),
		control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow")}); err != nil {
		t.Fatal(err)
	}
	tcp := strings.TrimPrefix(d.Addrs()[1], "tcp:")

	type want struct {
		list             []string
		origin, snapshot nbdsrv.Rep
	}
	for _, tt := range []struct {
		name, network string
		cert          *tlstest.Cert
		plain         bool
		want          want
	}{
		{"tcp plain", "tcp", nil, true, want{nil, nbdsrv.RepErrTLSReqd, nbdsrv.RepErrTLSReqd}},
		{"tcp alice", "tcp", &pki.Alice, false, want{[]string{"data"}, nbdsrv.RepAck, nbdsrv.RepErrPolicy}},
		{"tcp bob", "tcp", &pki.Bob, false, want{[]string{"s"}, nbdsrv.RepErrPolicy, nbdsrv.RepAck}},
		{"unix plain", "unix", nil, true, want{[]string{"data", "s"}, nbdsrv.RepAck, nbdsrv.RepAck}},
		{"unix bob", "unix", &pki.Bob, false, want{[]string{"data", "s"}, nbdsrv.RepAck, nbdsrv.RepAck}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			addr := map[string]string{"tcp": tcp, "unix": e.sock}[tt.network]
			o := dialOpt(t, tt.network, addr)
			if !tt.plain && !o.startTLS(pki.ClientConfig(tt.cert)) {
				t.Fatal("TLS handshake failed")
			}
			if rep, desc := o.info("data"); rep != tt.want.origin || (rep == nbdsrv.RepAck && desc != "nbdsnap origin data") {
				t.Errorf("INFO data: %v %q, want %v", rep, desc, tt.want.origin)
			}
			if rep, _ := o.info("s"); rep != tt.want.snapshot {
				t.Errorf("INFO s: %v, want %v", rep, tt.want.snapshot)
			}
			names, rep := o.list()
			if tt.want.list == nil {
				if rep != nbdsrv.RepErrTLSReqd {
					t.Errorf("LIST: %v, want TLS_REQD", rep)
				}
			} else if rep != nbdsrv.RepAck || !slices.Equal(names, tt.want.list) {
				t.Errorf("LIST: %q %v, want %q", names, rep, tt.want.list)
			}
		})
	}
	for _, tt := range []struct {
		name, network string
		cert          *tlstest.Cert
	}{{"tcp no certificate", "tcp", nil}, {"tcp untrusted", "tcp", &pki.Mallory}, {"unix untrusted", "unix", &pki.Mallory}} {
		t.Run(tt.name, func(t *testing.T) {
			addr := map[string]string{"tcp": tcp, "unix": e.sock}[tt.network]
			o := dialOpt(t, tt.network, addr)
			// The server speaks first only to refuse: with TLS 1.3 the
			// client's handshake ends before the server has checked its
			// certificate, so the refusal arrives as an alert.
			if o.startTLS(pki.ClientConfig(tt.cert)) {
				if _, err := o.br.ReadByte(); err == nil {
					t.Fatal("the server accepted the session")
				}
			}
		})
	}
}

// TestTLSAllow: with --tls=allow a TCP listener serves plain clients too,
// but an export with an allow-list is TLS-only to them.
func TestTLSAllow(t *testing.T) {
	pki := tlstest.New(t)
	e, tc := tlsEnv(t, pki)
	tc.Mode = TLSAllow
	tc.AllowSnapshots = []string{"bob"}
	cfg := e.config()
	cfg.Listen = []string{"tcp:127.0.0.1:0"}
	cfg.TLS = tc
	d := start(t, cfg)
	if _, err := control.NewClient(e.ctl).Create(context.Background(),
		control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow")}); err != nil {
		t.Fatal(err)
	}
	o := dialOpt(t, "tcp", strings.TrimPrefix(d.Addrs()[0], "tcp:"))
	if rep, _ := o.info("data"); rep != nbdsrv.RepAck {
		t.Errorf("plain INFO data: %v, want ACK", rep)
	}
	if rep, _ := o.info("s"); rep != nbdsrv.RepErrTLSReqd {
		t.Errorf("plain INFO s: %v, want TLS_REQD", rep)
	}
	if names, _ := o.list(); !slices.Equal(names, []string{"data"}) {
		t.Errorf("plain LIST: %q", names)
	}
	if !o.startTLS(pki.ClientConfig(&pki.Bob)) {
		t.Fatal("TLS handshake failed")
	}
	if rep, _ := o.info("s"); rep != nbdsrv.RepAck {
		t.Errorf("bob INFO s: %v, want ACK", rep)
	}
}

// TestTLSStartRefusals: every TLS setting that cannot work stops Start
// with one line naming the problem, before anything is bound or written;
// a TCP address other than loopback is refused without --tls=require
// unless InsecureTCP (192.0.2.1 is a documentation address this host does
// not have: a start let through fails to bind it, so nothing is exposed).
func TestTLSStartRefusals(t *testing.T) {
	pki := tlstest.New(t)
	e, good := tlsEnv(t, pki)
	bobKey := filepath.Join(e.dir, "bob-key.pem")
	noCA := filepath.Join(e.dir, "no-ca.pem")
	for f, b := range map[string][]byte{bobKey: pki.Bob.KeyPEM, noCA: []byte("not a certificate\n")} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	with := func(f func(c *Config)) func() Config {
		return func() Config {
			c := e.config()
			c.TLS = good
			f(&c)
			return c
		}
	}
	tests := []struct {
		name string
		cfg  func() Config
		want string
	}{
		{"unknown mode", with(func(c *Config) { c.TLS.Mode = "maybe" }), `--tls "maybe": want off, allow or require`},
		{"require without certificate", with(func(c *Config) { c.TLS = TLSConfig{Mode: TLSRequire} }), "--tls=require needs the server's certificate and key"},
		{"key without certificate", with(func(c *Config) { c.TLS.CertFile = "" }), "need --tls-cert"},
		{"off with a certificate", with(func(c *Config) { c.TLS.Mode = TLSOff }), "--tls=off, but"},
		{"allow-list without CA", with(func(c *Config) { c.TLS.CAFile = ""; c.TLS.AllowOrigin = []string{"alice"} }), "needs --tls-ca"},
		{"missing certificate", with(func(c *Config) { c.TLS.CertFile = filepath.Join(e.dir, "nope.pem") }), "no such file or directory"},
		{"key of another certificate", with(func(c *Config) { c.TLS.KeyFile = bobKey }), "private key does not match public key"},
		{"CA without certificates", with(func(c *Config) { c.TLS.CAFile = noCA }), "no PEM certificate in it"},
		{"missing CA", with(func(c *Config) { c.TLS.CAFile = filepath.Join(e.dir, "nope.pem") }), "TLS CA: open"},
		{"network address without TLS", with(func(c *Config) { c.TLS = TLSConfig{}; c.Listen = []string{"tcp:192.0.2.1:0"} }), "not a loopback address"},
		{"network address with --tls=allow", with(func(c *Config) { c.TLS.Mode = TLSAllow; c.Listen = []string{"tcp:192.0.2.1:0"} }), "not a loopback address"},
		{"network address, --insecure-tcp", with(func(c *Config) { c.TLS = TLSConfig{}; c.InsecureTCP = true; c.Listen = []string{"tcp:192.0.2.1:0"} }), "cannot assign requested address"},
		{"network address, --tls=require", with(func(c *Config) { c.Listen = []string{"tcp:192.0.2.1:0"} }), "cannot assign requested address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := disktest.Record(t, e.dir)
			d, err := Start(context.Background(), tt.cfg())
			if err == nil {
				d.Shutdown(context.Background())
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q, want one line containing %q", err, tt.want)
			}
			before.Unchanged(t, disktest.Record(t, e.dir))
		})
	}
}
