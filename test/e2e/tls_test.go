package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/disktest"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// tlsCerts is a certificate authority made with openssl, the daemon's
// certificate for 127.0.0.1 and localhost, and one directory per client in
// the layout libnbd (tls-certificates=DIR) and qemu (tls-creds-x509 dir=)
// read: ca-cert.pem, client-cert.pem, client-key.pem. alice's certificate
// has CN alice, bob's CN bob and the SAN email bob@example.com; nocert has
// only the CA; rogue holds a certificate with CN alice from another CA of
// the same name (a client sends only a certificate whose issuer's name the
// server asked for).
type tlsCerts struct {
	dir, ca, cert, key        string
	alice, bob, nocert, rogue string
}

func makeCerts(t *testing.T) tlsCerts {
	t.Helper()
	testenv.RequireTool(t, "openssl")
	dir := t.TempDir()
	p := func(name ...string) string { return filepath.Join(append([]string{dir}, name...)...) }
	c := tlsCerts{dir: dir, ca: p("ca-cert.pem"), cert: p("server-cert.pem"), key: p("server-key.pem"),
		alice: p("alice"), bob: p("bob"), nocert: p("nocert"), rogue: p("rogue")}
	ec := []string{"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"}
	newCA := func(name string) {
		run(t, "openssl", append([]string{"req", "-x509", "-days", "2", "-subj", "/CN=nbdsnap test CA",
			"-keyout", p(name + "-key.pem"), "-out", p(name + "-cert.pem")}, ec...)...)
	}
	// issue makes a key and a certificate signed by ca with the given
	// extensions.
	issue := func(ca, cn, ext, certOut, keyOut string) {
		extFile := certOut + ".ext"
		if err := os.WriteFile(extFile, []byte(ext), 0o600); err != nil {
			t.Fatal(err)
		}
		csr := certOut + ".csr"
		run(t, "openssl", append([]string{"req", "-subj", "/CN=" + cn, "-keyout", keyOut, "-out", csr}, ec...)...)
		run(t, "openssl", "x509", "-req", "-days", "2", "-in", csr, "-CA", p(ca+"-cert.pem"), "-CAkey", p(ca+"-key.pem"),
			"-CAcreateserial", "-CAserial", p(ca+".srl"), "-extfile", extFile, "-out", certOut)
	}
	newCA("ca")
	newCA("rogue-ca")
	issue("ca", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", c.cert, c.key)
	client := "extendedKeyUsage=clientAuth\n"
	for _, cl := range []struct{ dir, ca, cn, ext string }{
		{c.alice, "ca", "alice", client},
		{c.bob, "ca", "bob", client + "subjectAltName=email:bob@example.com\n"},
		{c.rogue, "rogue-ca", "alice", client},
		{c.nocert, "", "", ""},
	} {
		if err := os.Mkdir(cl.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		ca, err := os.ReadFile(c.ca) // every client trusts the daemon
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(cl.dir, "ca-cert.pem"), ca, 0o600); err != nil {
			t.Fatal(err)
		}
		if cl.ca != "" {
			issue(cl.ca, cl.cn, cl.ext, filepath.Join(cl.dir, "client-cert.pem"), filepath.Join(cl.dir, "client-key.pem"))
		}
	}
	return c
}

// startTLSDaemon serves origin on its unix socket and on a TCP port of
// 127.0.0.1 with --tls=require (the default with a certificate), client
// certificates checked against the CA, the origin's export allowed to
// alice and the snapshots' to bob@example.com; it returns the daemon and
// its TCP address.
func startTLSDaemon(t *testing.T, dir, origin string, c tlsCerts) (*daemon, string) {
	t.Helper()
	d := startDaemon(t, dir, origin, "--listen", "tcp:127.0.0.1:0",
		"--tls-cert", c.cert, "--tls-key", c.key, "--tls-ca", c.ca,
		"--tls-allow-origin", "alice", "--tls-allow-snapshots", "bob@example.com")
	st := d.status(t)
	if len(st.Listen) != 2 || !strings.HasPrefix(st.Listen[1], "tcp:127.0.0.1:") {
		t.Fatalf("listen %v", st.Listen)
	}
	return d, strings.TrimPrefix(st.Listen[1], "tcp:")
}

// nbds is the libnbd URI of export over TLS on TCP with the client
// certificates in certDir.
func nbds(addr, export, certDir string) string {
	return "nbds://" + addr + "/" + export + "?tls-certificates=" + certDir
}

// qemuTLS is the qemu-img arguments that open export over TLS on TCP with
// the client certificates in certDir.
func qemuTLS(addr, export, certDir string) []string {
	host, port, _ := strings.Cut(addr, ":")
	return []string{"--object", "tls-creds-x509,id=tls0,dir=" + certDir + ",endpoint=client",
		"--image-opts", "driver=nbd,host=" + host + ",port=" + port + ",export=" + export + ",tls-creds=tls0"}
}

// fails runs a tool that must fail and returns what it printed.
func fails(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %s succeeded:\n%s", name, strings.Join(args, " "), out)
	}
	return string(out)
}

// TestTLSRemoteBackup: a backup over the network, as the README shows it.
// With --tls=require on TCP, bob (allowed on snapshots) copies a snapshot
// with nbdcopy over nbds:// and gets it bit-exact while the origin has
// been overwritten since; alice (allowed on the origin) reads the origin
// with qemu-img and nbdinfo, and sees only it in the export list, with no
// path in its description. The unix socket serves plain clients and TLS
// clients alike.
func TestTLSRemoteBackup(t *testing.T) {
	e2e(t)
	for _, tool := range []string{"nbdinfo", "nbdcopy", "qemu-img", "qemu-io"} {
		testenv.RequireTool(t, tool)
	}
	c := makeCerts(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	old := randomFile(t, origin, 4<<20)
	d, addr := startTLSDaemon(t, dir, origin, c)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))
	// A plain client on the unix socket, under --tls=require.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", d.uri("data"))

	for _, uri := range []string{nbds(addr, "s", c.bob), "nbds+unix:///s?socket=" + d.sock + "&tls-certificates=" + c.bob} {
		if got := readExport(t, uri); !bytes.Equal(got, old) {
			t.Fatalf("%s: the snapshot read over TLS differs from the origin at the create instant", uri)
		}
	}
	out := run(t, "qemu-img", append([]string{"info"}, qemuTLS(addr, "data", c.alice)...)...)
	if !strings.Contains(out, "virtual size: 4 MiB") {
		t.Errorf("qemu-img info over TLS:\n%s", out)
	}
	run(t, "qemu-img", "info", "--object", "tls-creds-x509,id=tls0,dir="+c.bob+",endpoint=client",
		"--image-opts", "driver=nbd,path="+d.sock+",export=s,tls-creds=tls0,tls-hostname=localhost")
	out = run(t, "nbdinfo", "--list", nbds(addr, "", c.alice))
	if !strings.Contains(out, `export="data"`) || strings.Contains(out, `export="s"`) ||
		!strings.Contains(out, "description: nbdsnap origin data") || strings.Contains(out, dir) {
		t.Errorf("nbdinfo --list as alice: want the origin only, described without a path:\n%s", out)
	}
	if got := readExport(t, nbds(addr, "data", c.alice)); !bytes.Equal(got[:64<<10], bytes.Repeat([]byte{0x55}, 64<<10)) {
		t.Error("the origin read over TLS lacks the write made through the unix socket")
	}
}

// TestTLSRefusals: who is turned away, and how. On TCP under
// --tls=require a plain client is told TLS is required
// (NBD_REP_ERR_TLS_REQD, which qemu reports as "TLS negotiation
// required"); a TLS client whose certificate is not on an export's
// allow-list is denied it (NBD_REP_ERR_POLICY, qemu's "Denied by server");
// a client without a certificate, or with one from another CA, fails the
// TLS handshake. Each refusal is in the daemon's log.
func TestTLSRefusals(t *testing.T) {
	e2e(t)
	for _, tool := range []string{"nbdinfo", "nbdcopy", "qemu-img"} {
		testenv.RequireTool(t, tool)
	}
	c := makeCerts(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	d, addr := startTLSDaemon(t, dir, origin, c)
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))

	host, port, _ := strings.Cut(addr, ":")
	out := fails(t, "qemu-img", "info", "--image-opts", "driver=nbd,host="+host+",port="+port+",export=data")
	if !strings.Contains(out, "TLS negotiation required before option 7 (go)") {
		t.Errorf("plain qemu-img on TCP:\n%s", out)
	}
	out = fails(t, "nbdinfo", "nbd://"+addr+"/data")
	if !strings.Contains(out, "server replied with error to opt_go request") {
		t.Errorf("plain nbdinfo on TCP:\n%s", out)
	}
	for _, tt := range []struct{ export, certs string }{{"data", c.bob}, {"s", c.alice}} {
		out := fails(t, "qemu-img", append([]string{"info"}, qemuTLS(addr, tt.export, tt.certs)...)...)
		if !strings.Contains(out, "Denied by server for option 7 (go)") {
			t.Errorf("qemu-img on %s with %s's certificate:\n%s", tt.export, filepath.Base(tt.certs), out)
		}
		fails(t, "nbdcopy", nbds(addr, tt.export, tt.certs), filepath.Join(dir, "copy.img"))
	}
	out = fails(t, "nbdinfo", nbds(addr, "data", c.nocert))
	if !strings.Contains(out, "TLS") {
		t.Errorf("nbdinfo without a certificate:\n%s", out)
	}
	fails(t, "nbdinfo", nbds(addr, "data", c.rogue))
	fails(t, "qemu-img", append([]string{"info"}, qemuTLS(addr, "data", c.rogue)...)...)
	// The unix socket does not require TLS.
	run(t, "nbdinfo", d.uri("s"))

	waitFor(t, func() bool {
		log := d.log.String()
		return strings.Contains(log, "client didn't provide a certificate") &&
			strings.Contains(log, "certificate signed by unknown authority") &&
			strings.Contains(log, `msg="nbd: client not allowed on export"`) &&
			strings.Contains(log, "identities=\"[bob bob@example.com]\"")
	})
}

// TestTLSBadServe: TLS settings that cannot work are refused at startup
// with one line, exit code 2 for a bad command line and 1 for bad files,
// leaving nothing behind; a TCP listener on an address other than loopback
// is refused without --tls=require, unless --insecure-tcp (192.0.2.1 is a
// documentation address this host does not have: the daemon let through
// fails to bind it, so nothing is exposed).
func TestTLSBadServe(t *testing.T) {
	e2e(t)
	c := makeCerts(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	empty := filepath.Join(c.dir, "empty-ca.pem")
	if err := os.WriteFile(empty, []byte("no certificate here\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tls := []string{"--tls-cert", c.cert, "--tls-key", c.key}
	for _, tt := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"require without certificate", []string{"--tls", "require"}, 2, "--tls=require needs the server's certificate and key (--tls-cert and --tls-key)"},
		{"unknown mode", append([]string{"--tls", "maybe"}, tls...), 2, `--tls "maybe": want off, allow or require`},
		{"allow-list without CA", append([]string{"--tls-allow-origin", "alice"}, tls...), 2, "needs --tls-ca"},
		{"missing certificate", []string{"--tls-cert", filepath.Join(dir, "nope.pem"), "--tls-key", c.key}, 1, "no such file or directory"},
		{"key of another certificate", []string{"--tls-cert", c.cert, "--tls-key", filepath.Join(c.alice, "client-key.pem")}, 1, "private key does not match public key"},
		{"CA without certificates", append([]string{"--tls-ca", empty}, tls...), 1, "TLS CA " + empty + ": no PEM certificate in it"},
		{"network address without TLS", []string{"--listen", "tcp:192.0.2.1:0"}, 1, "not a loopback address"},
		{"network address with --tls=allow", append([]string{"--listen", "tcp:192.0.2.1:0", "--tls", "allow"}, tls...), 1, "not a loopback address"},
		{"network address, --insecure-tcp", []string{"--listen", "tcp:192.0.2.1:0", "--insecure-tcp"}, 1, "cannot assign requested address"},
		{"network address, TLS required", append([]string{"--listen", "tcp:192.0.2.1:0"}, tls...), 1, "cannot assign requested address"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := disktest.Record(t, dir)
			_, errs, code := cli(t, append([]string{"serve", origin, "--name", "data", "--log-level", "error",
				"--listen", "unix:" + filepath.Join(dir, "data.sock"), "--control", filepath.Join(dir, "data.ctl"),
				"--state-dir", filepath.Join(dir, "state")}, tt.args...)...)
			if code != tt.code || !strings.Contains(errs, tt.want) || strings.Count(errs, "\n") != 1 {
				t.Fatalf("exit %d, stderr %q; want %d and one line containing %q", code, errs, tt.code, tt.want)
			}
			before.Unchanged(t, disktest.Record(t, dir))
		})
	}
}
