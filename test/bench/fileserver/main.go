// Command fileserver serves one file over NBD with nbdsrv, for the
// benchmarks in test/bench, for the hostile-client test (which measures its
// memory as a process of its own), and for poking at the server by hand.
//
//	fileserver -file /dev/shm/disk.img -unix /tmp/nbd.sock [-latency 1ms]
//	           [-tls-cert cert.pem -tls-key key.pem [-tls-ca ca.pem] [-tls-required]]
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // -pprof: profile the server under load
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv/filebackend"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fileserver:", err)
		os.Exit(1)
	}
}

func run() error {
	file := flag.String("file", "", "file to serve")
	sock := flag.String("unix", "", "unix socket to listen on")
	tcp := flag.String("tcp", "", "TCP address to listen on (e.g. 127.0.0.1:10809)")
	name := flag.String("name", "", "export name (also the default export)")
	latency := flag.Duration("latency", 0, "latency added to every backend request")
	readOnly := flag.Bool("readonly", false, "serve read-only")
	pprofAddr := flag.String("pprof", "", "serve net/http/pprof on this address")
	verbose := flag.Bool("v", false, "debug logging")
	maxConns := flag.Int("max-conns", 0, "connection limit (0 = nbdsrv default)")
	handshake := flag.Duration("handshake-timeout", 0, "negotiation deadline (0 = nbdsrv default)")
	maxReqs := flag.Int("max-requests", 0, "requests in flight per connection (0 = nbdsrv default)")
	tlsCert := flag.String("tls-cert", "", "offer TLS with this PEM certificate (needs -tls-key)")
	tlsKey := flag.String("tls-key", "", "PEM private key of -tls-cert")
	tlsCA := flag.String("tls-ca", "", "require client certificates signed by this PEM CA")
	tlsRequired := flag.Bool("tls-required", false, "refuse plain sessions")
	flag.Parse()
	if *file == "" || (*sock == "" && *tcp == "") {
		return fmt.Errorf("need -file and -unix or -tcp")
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	b, err := filebackend.Open(*file, *readOnly)
	if err != nil {
		return err
	}
	defer b.Close()
	b.Latency = *latency
	size, err := b.Size()
	if err != nil {
		return err
	}
	tlsCfg, err := tlsConfig(*tlsCert, *tlsKey, *tlsCA)
	if err != nil {
		return err
	}
	mode := nbdsrv.TLSOptional
	if *tlsRequired {
		mode = nbdsrv.TLSRequired
	}
	srv := nbdsrv.NewServer(nbdsrv.Config{Logger: log, MaxConns: *maxConns, HandshakeTimeout: *handshake,
		MaxRequestsPerConn: *maxReqs, TLS: tlsCfg})
	if err := srv.AddExport(nbdsrv.Export{Name: *name, Size: size, Backend: b, ReadOnly: *readOnly, MultiConn: true}); err != nil {
		return err
	}
	srv.SetDefaultExport(*name)
	if *pprofAddr != "" {
		go http.ListenAndServe(*pprofAddr, nil)
	}
	errc := make(chan error, 2)
	if *sock != "" {
		os.Remove(*sock)
		l, err := net.Listen("unix", *sock)
		if err != nil {
			return err
		}
		go func() { errc <- srv.ServeMode(l, mode) }()
	}
	if *tcp != "" {
		l, err := net.Listen("tcp", *tcp)
		if err != nil {
			return err
		}
		go func() { errc <- srv.ServeMode(l, mode) }()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-sig:
	case err := <-errc:
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(ctx)
}

// tlsConfig loads the server's certificate and, with a CA, requires client
// certificates it signed; nil without a certificate.
func tlsConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("-tls-cert, -tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("-tls-ca: %w", err)
		}
		cfg.ClientCAs = x509.NewCertPool()
		if !cfg.ClientCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("-tls-ca %s: no certificate", caFile)
		}
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
