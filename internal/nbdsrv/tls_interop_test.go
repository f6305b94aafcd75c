package nbdsrv_test

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv/filebackend"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/internal/tlstest"
)

// startOursTLS serves file as export "disk" on a unix socket that requires
// TLS, with client certificates verified against the PKI's CA.
func startOursTLS(t *testing.T, file string, pki *tlstest.PKI) *server {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s := nbdsrv.NewServer(nbdsrv.Config{Logger: log, TLS: pki.ServerConfig(tls.RequireAndVerifyClientCert)})
	b, err := filebackend.Open(file, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	size, err := b.Size()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(nbdsrv.Export{Name: "disk", Size: size, Backend: b}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(tempDir(t), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.ServeMode(l, nbdsrv.TLSRequired) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		<-done
	})
	return &server{kind: "nbdsrv", sock: sock, srv: s}
}

// TestTLSInterop: libnbd and qemu against a server that requires TLS,
// nbdkit first: nbdcopy over nbds+unix with a client certificate copies
// the disk both ways; a plain qemu-img is told TLS is required before GO;
// a client without a certificate is refused.
func TestTLSInterop(t *testing.T) {
	for _, tool := range []string{"nbdcopy", "nbdinfo", "qemu-img"} {
		testenv.RequireTool(t, tool)
	}
	pki := tlstest.New(t)
	serverDir, clientDir, nocertDir := tempDir(t), tempDir(t), tempDir(t)
	pki.WriteServerFiles(t, serverDir) // the names nbdkit's --tls-certificates reads
	for dir, files := range map[string]map[string][]byte{
		clientDir: {"ca-cert.pem": pki.CAPEM, "client-cert.pem": pki.Alice.CertPEM, "client-key.pem": pki.Alice.KeyPEM},
		nocertDir: {"ca-cert.pem": pki.CAPEM},
	} {
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	src := sparseImage(t, 4<<20, [2]int64{0, 1 << 20}, [2]int64{3 << 20, 4 << 20})
	for _, kind := range []string{"nbdkit", "nbdsrv"} {
		t.Run(kind, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(file, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			os.Truncate(file, 4<<20)
			var s *server
			if kind == "nbdsrv" {
				s = startOursTLS(t, file, pki)
			} else {
				s = startNbdkit(t, "--tls=require", "--tls-certificates="+serverDir, "--tls-verify-peer",
					"--export-name=disk", "file", file)
			}
			uri := func(certs string) string {
				return "nbds+unix:///disk?socket=" + s.sock + "&tls-certificates=" + certs
			}
			run(t, "nbdcopy", src, uri(clientDir))
			back := filepath.Join(t.TempDir(), "back.img")
			run(t, "nbdcopy", uri(clientDir), back)
			run(t, "cmp", src, back)
			run(t, "cmp", src, file)

			out, err := exec.Command("qemu-img", "info", "--image-opts", "driver=nbd,path="+s.sock+",export=disk").CombinedOutput()
			if err == nil || !strings.Contains(string(out), "TLS negotiation required before option 7 (go)") {
				t.Errorf("plain qemu-img: %v\n%s", err, out)
			}
			if out, err := exec.Command("nbdinfo", uri(nocertDir)).CombinedOutput(); err == nil {
				t.Errorf("nbdinfo without a client certificate succeeded:\n%s", out)
			}
		})
	}
}
