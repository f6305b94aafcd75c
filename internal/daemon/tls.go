package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// TLS on the NBD listeners (`nbdsnap serve --tls ...`). The rules:
//
//   - TLS is offered on every listener once a certificate is configured;
//     with --tls=require a TCP listener refuses plain sessions
//     (nbdsrv.TLSRequired). A unix socket never requires TLS: its file mode
//     (0600) is its guard, and local tools (nbd-client) speak plain NBD.
//   - With a CA, every TLS client must present a certificate it signed.
//   - An allow-list (AllowOrigin, AllowSnapshots) limits its class of
//     exports to TLS clients whose verified certificate names one of its
//     IDs (subject CN or any SAN), plus any client of a unix socket; a
//     plain TCP client is then told to start TLS (NBD_REP_ERR_TLS_REQD).
//     An empty list lets every client that got through the listener in.
//   - A TCP listener on an address other than loopback must require TLS,
//     unless the user says --insecure-tcp: a plain one would hand the disk,
//     read-write, to anyone on the network.

// TLSMode is the --tls setting.
type TLSMode string

const (
	TLSOff     TLSMode = "off"     // no TLS
	TLSAllow   TLSMode = "allow"   // TLS offered, plain sessions served too
	TLSRequire TLSMode = "require" // TLS required on TCP listeners
)

// TLSConfig is how the NBD listeners use TLS. The zero value is no TLS.
type TLSConfig struct {
	// Mode: empty means TLSRequire with a certificate, TLSOff without.
	Mode TLSMode
	// CertFile and KeyFile are the server's PEM certificate (chain) and
	// private key.
	CertFile, KeyFile string
	// CAFile, if set, holds the PEM CA certificates that must have signed
	// every TLS client's certificate.
	CAFile string
	// AllowOrigin and AllowSnapshots are the allow-lists of the origin's
	// export and of the snapshots' exports: certificate subject CNs or
	// SANs (DNS name, email, URI, IP). They need CAFile.
	AllowOrigin, AllowSnapshots []string
}

// mode resolves an empty Mode.
func (c TLSConfig) mode() TLSMode {
	switch {
	case c.Mode != "":
		return c.Mode
	case c.CertFile != "":
		return TLSRequire
	}
	return TLSOff
}

// Check reports a TLS configuration that cannot work, without touching
// any file.
func (c TLSConfig) Check() error {
	m := c.mode()
	switch m {
	case TLSOff:
		switch {
		case c.CertFile == "" && c.KeyFile == "" && c.CAFile == "" && len(c.AllowOrigin)+len(c.AllowSnapshots) == 0:
			return nil
		case c.Mode == TLSOff:
			return errors.New("--tls=off, but a TLS certificate, key, CA or allow-list is given")
		}
		return errors.New("--tls-key, --tls-ca and the allow-lists need --tls-cert")
	case TLSAllow, TLSRequire:
	default:
		return fmt.Errorf("--tls %q: want off, allow or require", string(c.Mode))
	}
	if c.CertFile == "" || c.KeyFile == "" {
		return fmt.Errorf("--tls=%s needs the server's certificate and key (--tls-cert and --tls-key)", m)
	}
	if c.CAFile == "" && len(c.AllowOrigin)+len(c.AllowSnapshots) > 0 {
		return errors.New("an allow-list (--tls-allow-origin, --tls-allow-snapshots) needs --tls-ca: only a verified client certificate names its client")
	}
	for _, id := range slices.Concat(c.AllowOrigin, c.AllowSnapshots) {
		if id == "" {
			return errors.New("an allow-list entry is empty")
		}
	}
	return nil
}

// load checks c and reads its files: the server's TLS configuration, or
// nil with TLS off.
func (c TLSConfig) load() (*tls.Config, error) {
	if err := c.Check(); err != nil {
		return nil, fmt.Errorf("TLS: %w", err)
	}
	if c.mode() == TLSOff {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s and key %s: %w", c.CertFile, c.KeyFile, err)
	}
	// TLS 1.2 is the oldest the NBD spec lets an implementation offer by
	// default.
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("TLS CA: %w", err)
		}
		cfg.ClientCAs = x509.NewCertPool()
		if !cfg.ClientCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA %s: no PEM certificate in it", c.CAFile)
		}
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// listenMode is the TLS mode of a listener: required on TCP under
// --tls=require, optional everywhere else (nbdsrv offers TLS only with a
// certificate).
func (c TLSConfig) listenMode(l net.Listener) nbdsrv.TLSMode {
	if c.mode() == TLSRequire && l.Addr().Network() == "tcp" {
		return nbdsrv.TLSRequired
	}
	return nbdsrv.TLSOptional
}

// checkExposure refuses a TCP listen address other than loopback unless
// TLS is required or insecure allows it. It runs before anything is bound:
// a host name is judged by every address it resolves to.
func (c TLSConfig) checkExposure(ctx context.Context, a listenAddr, insecure bool) error {
	if a.network != "tcp" || insecure || c.mode() == TLSRequire {
		return nil
	}
	host, _, err := net.SplitHostPort(a.addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", a, err)
	}
	ips := []net.IP{net.ParseIP(host)}
	if ips[0] == nil {
		if ips, err = net.DefaultResolver.LookupIP(ctx, "ip", host); err != nil {
			return fmt.Errorf("listen on %s: %w", a, err)
		}
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return fmt.Errorf("listen on %s: not a loopback address, and without --tls=require anyone on the network could read and write the disk; configure TLS (--tls-cert, --tls-key, --tls-ca) or pass --insecure-tcp", a)
		}
	}
	return nil
}

// allow is the nbdsrv.Export.Allow of an export class with allow-list ids:
// nil (everyone) for an empty list; else clients of a unix socket, and TLS
// clients whose verified certificate names one of ids.
func allow(ids []string) func(nbdsrv.Peer) bool {
	if len(ids) == 0 {
		return nil
	}
	return func(p nbdsrv.Peer) bool {
		if p.LocalAddr.Network() == "unix" {
			return true
		}
		for _, id := range p.Identities() {
			if slices.Contains(ids, id) {
				return true
			}
		}
		return false
	}
}
