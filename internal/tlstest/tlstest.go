// Package tlstest makes certificates for tests, in memory and as PEM
// files: a CA, a server certificate for 127.0.0.1 and localhost signed by
// it, client certificates for alice (with a SAN of every kind) and bob, and
// mallory's, which claims to be alice but comes from another CA. Keys are
// ECDSA P-256, so that making them costs milliseconds.
package tlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cert is a certificate with its key, usable and as PEM.
type Cert struct {
	tls.Certificate
	CertPEM, KeyPEM []byte
}

// PKI is one test's certificates.
type PKI struct {
	Pool                        *x509.CertPool // the CA
	CAPEM                       []byte
	Server, Alice, Bob, Mallory Cert
}

// New makes a PKI; certificates are valid from an hour ago for a day.
func New(t testing.TB) *PKI {
	t.Helper()
	ca, caKey, caPEM := newCA(t, "nbdsnap test CA")
	other, otherKey, _ := newCA(t, "another CA")
	p := &PKI{Pool: x509.NewCertPool(), CAPEM: caPEM}
	p.Pool.AddCert(ca)
	client := func(cn string) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	}
	alice := client("alice")
	alice.DNSNames = []string{"alice.example"}
	alice.EmailAddresses = []string{"alice@example.com"}
	alice.URIs = []*url.URL{{Scheme: "spiffe", Host: "example.org", Path: "/alice"}}
	alice.IPAddresses = []net.IP{net.ParseIP("192.0.2.1")}
	p.Server = issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, caKey)
	p.Alice = issue(t, alice, ca, caKey)
	p.Bob = issue(t, client("bob"), ca, caKey)
	p.Mallory = issue(t, client("alice"), other, otherKey)
	return p
}

func newCA(t testing.TB, cn string) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// issue signs tmpl with the CA.
func issue(t testing.TB, tmpl, ca *x509.Certificate, caKey *ecdsa.PrivateKey) Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl.SerialNumber, err = rand.Int(rand.Reader, big.NewInt(1<<62)); err != nil {
		t.Fatal(err)
	}
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c := Cert{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	}
	if c.Certificate, err = tls.X509KeyPair(c.CertPEM, c.KeyPEM); err != nil {
		t.Fatal(err)
	}
	return c
}

// ServerConfig is a server's TLS configuration that checks client
// certificates against the CA as auth says.
func (p *PKI) ServerConfig(auth tls.ClientAuthType) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.Server.Certificate}, ClientCAs: p.Pool, ClientAuth: auth}
}

// ClientConfig trusts the CA and presents c (no certificate if nil), even
// when the server asks for certificates of other CAs (crypto/tls would send
// none then): mallory's must reach the server to be refused there.
func (p *PKI) ClientConfig(c *Cert) *tls.Config {
	cfg := &tls.Config{RootCAs: p.Pool, ServerName: "localhost"}
	if c != nil {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c.Certificate, nil }
	}
	return cfg
}

// WriteServerFiles writes the server's certificate and key and the CA as
// PEM files into dir and returns their paths.
func (p *PKI) WriteServerFiles(t testing.TB, dir string) (cert, key, ca string) {
	t.Helper()
	cert, key, ca = filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"), filepath.Join(dir, "ca-cert.pem")
	for f, b := range map[string][]byte{cert: p.Server.CertPEM, key: p.Server.KeyPEM, ca: p.CAPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return cert, key, ca
}
