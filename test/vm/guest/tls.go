package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The tls scenario's TCP listener (the guest's loopback: it has no other
// network) and certificates.
const (
	tlsHost = "127.0.0.1"
	tlsPort = "10809"
	tlsDir  = "/work/tls"
	// The client certificates' subject CNs, which the daemon's allow-lists
	// name.
	originClient   = "vmhost"
	snapshotClient = "backup"
)

// clientCert is a client certificate and its key as PEM files.
type clientCert struct {
	cert, key string
}

// pkiFiles are the PEM files writePKI makes.
type pkiFiles struct {
	ca, serverCert, serverKey string
	vmhost, backup            clientCert
}

// writePKI makes a CA, a server certificate for localhost and 127.0.0.1 and
// client certificates for originClient and snapshotClient, all ECDSA P-256
// (milliseconds to make, even under TCG), and writes them as PEM files into
// dir. They are valid from an hour ago, in case the guest's clock is behind
// the host's, for a day.
func writePKI(dir string) (pkiFiles, error) {
	f := pkiFiles{
		ca:         filepath.Join(dir, "ca-cert.pem"),
		serverCert: filepath.Join(dir, "server-cert.pem"),
		serverKey:  filepath.Join(dir, "server-key.pem"),
		vmhost:     clientCert{filepath.Join(dir, "vmhost-cert.pem"), filepath.Join(dir, "vmhost-key.pem")},
		backup:     clientCert{filepath.Join(dir, "backup-cert.pem"), filepath.Join(dir, "backup-key.pem")},
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return f, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, fmt.Errorf("CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "nbdsnap VM test CA"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := signCert(caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return f, fmt.Errorf("CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return f, fmt.Errorf("CA certificate: %w", err)
	}
	if err := writePEM(f.ca, "CERTIFICATE", caDER); err != nil {
		return f, err
	}
	server := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP(tlsHost)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if err := issueFiles(server, ca, caKey, f.serverCert, f.serverKey); err != nil {
		return f, fmt.Errorf("server certificate: %w", err)
	}
	for _, c := range []struct {
		cn    string
		files clientCert
	}{{originClient, f.vmhost}, {snapshotClient, f.backup}} {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: c.cn},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if err := issueFiles(tmpl, ca, caKey, c.files.cert, c.files.key); err != nil {
			return f, fmt.Errorf("client certificate %s: %w", c.cn, err)
		}
	}
	return f, nil
}

// issueFiles makes a key, signs tmpl for it with the CA and writes both as
// PEM files.
func issueFiles(tmpl, ca *x509.Certificate, caKey *ecdsa.PrivateKey, certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := signCert(tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEM(certFile, "CERTIFICATE", der); err != nil {
		return err
	}
	return writePEM(keyFile, "PRIVATE KEY", keyDER)
}

// signCert gives tmpl a random serial number and the validity period and
// signs it with the issuer's key.
func signCert(tmpl, issuer *x509.Certificate, pub *ecdsa.PublicKey, issuerKey *ecdsa.PrivateKey) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	return x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, issuerKey)
}

func writePEM(name, blockType string, der []byte) error {
	return os.WriteFile(name, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600)
}

// tlsFlags are nbd-client's TLS flags for a client certificate. With
// -cacertfile (and the host name nbd-client checks, by default the host it
// dials: 127.0.0.1, in the server certificate's IP SANs) nbd-client
// verifies the server's certificate; without it, it would take any.
func (f pkiFiles) tlsFlags(c clientCert) []string {
	return []string{"-certfile", c.cert, "-keyfile", c.key, "-cacertfile", f.ca}
}

// nbdClientTCP is nbd-client's command line for attaching dev to an export
// on the tls scenario's TCP listener, with more flags.
func nbdClientTCP(dev, export string, flags ...string) []string {
	return append([]string{tlsHost, tlsPort, dev, "-N", export}, flags...)
}

// attachTLS attaches dev to an export over TCP with TLS, presenting c. It
// returns the pid of the process nbd-client leaves running for the device:
// Debian 12's nbd-client (3.24) does TLS in userspace, in a child that
// relays between the socket it hands the kernel and the TLS connection,
// and that lives until the kernel closes its end (a detach).
func (g *guest) attachTLS(ctx context.Context, dev, export string, pki pkiFiles, c clientCert, flags ...string) (int, error) {
	before, err := liveNBDClients()
	if err != nil {
		return 0, err
	}
	if _, err := g.run(ctx, "nbd-client", nbdClientTCP(dev, export, append(pki.tlsFlags(c), flags...)...)...); err != nil {
		return 0, err
	}
	if err := waitAttached(ctx, dev, true); err != nil {
		return 0, err
	}
	after, err := waitNBDClients(ctx, func(pids []int) bool {
		return len(pids) == len(before)+1 && containsAll(pids, before)
	})
	if err != nil {
		return 0, fmt.Errorf("%s attached, but not one TLS relay process more than before (%v): %w", dev, before, err)
	}
	for _, pid := range after {
		if !slices.Contains(before, pid) {
			g.log.Info("TLS relay", "dev", dev, "pid", pid)
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no new nbd-client process in %v (before %v)", after, before) // cannot happen: waitNBDClients checked
}

// detachTLS detaches dev and requires its TLS relay (pid) to exit, and the
// other relays (keep) to live on.
func (g *guest) detachTLS(ctx context.Context, dev string, pid int, keep ...int) error {
	if err := g.detach(ctx, dev); err != nil {
		return err
	}
	if err := expectNBDClients(ctx, keep...); err != nil {
		return fmt.Errorf("after detaching %s (relay %d): %w", dev, pid, err)
	}
	return nil
}

// refusedAttach runs nbd-client, which must fail saying why (reason), and
// leave dev unattached and no process behind: the live nbd-client
// processes must then be exactly relays.
func (g *guest) refusedAttach(ctx context.Context, dev, reason string, relays []int, args ...string) error {
	out, code, err := g.runCode(ctx, "nbd-client", args...)
	if err != nil {
		return err
	}
	g.log.Info("nbd-client refused", "exit", code, "output", strings.TrimSpace(out))
	if code == 0 {
		return fmt.Errorf("nbd-client %s succeeded; it should have been refused:\n%s", strings.Join(args, " "), out)
	}
	if !strings.Contains(out, reason) {
		return fmt.Errorf("nbd-client %s failed (exit status %d), but not saying %q:\n%s", strings.Join(args, " "), code, reason, out)
	}
	// nbd-client hands the kernel its socket only after the negotiation
	// succeeded, and exits after the kernel took it: had it attached, the
	// pid file would be there by now.
	if _, err := os.Stat(pidFile(dev)); err == nil {
		return fmt.Errorf("%s is attached after the refused nbd-client", dev)
	}
	return expectNBDClients(ctx, relays...)
}

// liveNBDClients returns the pids of the nbd-client processes that are
// alive, in ascending order. A zombie does not count: a TLS relay's parent
// exits before it, and /init, which inherits it, need not reap it.
func liveNBDClients() ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue // not a process
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // it exited meanwhile
		}
		// "pid (comm) state ...", and comm may hold spaces and parentheses.
		s := string(stat)
		open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || closing < open || len(s) < closing+3 {
			return nil, fmt.Errorf("/proc/%d/stat: cannot parse %q", pid, s)
		}
		if state := s[closing+2]; s[open+1:closing] == "nbd-client" && state != 'Z' && state != 'X' {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids, nil
}

// waitNBDClients polls the live nbd-client processes until done accepts
// them, for up to 10 s (a relay forks off while nbd-client negotiates and
// exits when the kernel lets go of the socket, both asynchronously), and
// returns them.
func waitNBDClients(ctx context.Context, done func([]int) bool) ([]int, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		pids, err := liveNBDClients()
		if err != nil {
			return nil, err
		}
		if done(pids) {
			return pids, nil
		}
		if err := sleepCtx(ctx, 20); err != nil {
			return pids, fmt.Errorf("live nbd-client processes %v: %w", pids, err)
		}
	}
}

// expectNBDClients waits until the live nbd-client processes are exactly
// pids.
func expectNBDClients(ctx context.Context, pids ...int) error {
	want := slices.Sorted(slices.Values(pids))
	got, err := waitNBDClients(ctx, func(p []int) bool { return slices.Equal(p, want) })
	if err != nil {
		return fmt.Errorf("want exactly the nbd-client processes %v, have %v: %w", want, got, err)
	}
	return nil
}

func containsAll(s, sub []int) bool {
	for _, x := range sub {
		if !slices.Contains(s, x) {
			return false
		}
	}
	return true
}

// scenarioTLS attaches the kernel's NBD client to the daemon's exports over
// TCP with TLS: the origin with the certificate its allow-list names, the
// snapshot with the one the snapshots' allow-list names; the other
// certificate on the origin, and plain TCP, are refused.
func scenarioTLS(ctx context.Context, g *guest) error {
	var pki pkiFiles
	if err := g.step("make certificates", func() (err error) {
		pki, err = writePKI(tlsDir)
		return err
	}); err != nil {
		return err
	}
	serveFlags := []string{"--listen", "tcp:" + net.JoinHostPort(tlsHost, tlsPort),
		"--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-ca", pki.ca,
		"--tls-allow-origin", originClient, "--tls-allow-snapshots", snapshotClient}
	var originRelay int
	d, err := g.originUpWith(ctx, serveFlags, func() (err error) {
		originRelay, err = g.attachTLS(ctx, nbd0, exportName, pki, pki.vmhost)
		return err
	})
	if err != nil {
		return err
	}
	a, err := g.setAFrozen(ctx, 32)
	if err != nil {
		return err
	}
	origin, err := g.setB(ctx, a)
	if err != nil {
		return err
	}
	var snapRelay int
	if err := g.step("attach snapshot over TLS as "+snapshotClient+", -readonly", func() (err error) {
		snapRelay, err = g.attachTLS(ctx, nbd1, "snap1", pki, pki.backup, "-readonly")
		return err
	}); err != nil {
		return err
	}
	if err := g.snapshotIsSetA(ctx, a); err != nil {
		return err
	}
	if err := g.step("detach snapshot: its TLS relay exits", func() error {
		return g.detachTLS(ctx, nbd1, snapRelay, originRelay)
	}); err != nil {
		return err
	}
	// The refused attempts use nbd1, free again; the origin stays attached
	// and in use throughout.
	if err := g.step("origin refused to "+snapshotClient+" (allow-list)", func() error {
		return g.refusedAttach(ctx, nbd1, "not allowed by server policy", []int{originRelay},
			nbdClientTCP(nbd1, exportName, pki.tlsFlags(pki.backup)...)...)
	}); err != nil {
		return err
	}
	if err := g.step("plain TCP refused (TLS required)", func() error {
		if err := g.refusedAttach(ctx, nbd1, "TLS required", []int{originRelay}, nbdClientTCP(nbd1, "snap1")...); err != nil {
			return err
		}
		// The allow-lists alone refuse a plain client as well, with the
		// same error; a listing tells the listener's requirement apart:
		// they would answer it, leaving their exports out.
		out, code, err := g.runCode(ctx, "nbd-client", "-l", tlsHost, tlsPort)
		if err != nil {
			return err
		}
		if code == 0 || !strings.Contains(out, "TLS required") {
			return fmt.Errorf("nbd-client -l over plain TCP: exit status %d, want a failure saying TLS required:\n%s", code, out)
		}
		return nil
	}); err != nil {
		return err
	}
	// A fresh connection after the refusals: the daemon still serves over
	// TLS. The device's page cache went with its last close, so e2fsck
	// reads from the daemon.
	if err := g.step("daemon still serving: snapshot over TLS again, e2fsck -fn", func() error {
		if d.exited() {
			return fmt.Errorf("the daemon exited: %v", d.err)
		}
		relay, err := g.attachTLS(ctx, nbd1, "snap1", pki, pki.backup, "-readonly")
		if err != nil {
			return err
		}
		if err := g.fsckClean(ctx, nbd1); err != nil {
			return err
		}
		if _, err := g.requireValid(ctx, "snap1"); err != nil {
			return err
		}
		return g.detachTLS(ctx, nbd1, relay, originRelay)
	}); err != nil {
		return err
	}
	if err := g.originDown(ctx, origin); err != nil {
		return err
	}
	if err := g.step("kernel log", func() error { return g.noKernelProblems(ctx, nbd0, nbd1) }); err != nil {
		return err
	}
	// Detached here rather than in finish, so that the relay is seen to
	// exit because of the detach, not because the daemon stopped.
	if err := g.step("detach origin: its TLS relay exits", func() error {
		return g.detachTLS(ctx, nbd0, originRelay)
	}); err != nil {
		return err
	}
	return g.finish(ctx, d, "snap1")
}
