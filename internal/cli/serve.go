package cli

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/daemon"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

type serveOptions struct {
	name        string
	listen      []string
	control     string
	stateDir    string
	cacheSize   int64
	heldSize    int64
	reqMemory   int64
	logLevel    string
	logFormat   string
	stopTimeout time.Duration
	waitStores  time.Duration
	movedOrigin bool
	tls         daemon.TLSConfig
	insecureTCP bool
	metrics     string
}

// DefaultStateRoot holds each daemon's state directory, NAME under it,
// when --state-dir is not given.
const DefaultStateRoot = "/var/lib/nbdsnap"

// crashPointEnv names the environment variable through which tests make
// the daemon kill itself at a step of create or clear (daemon.Config's
// CrashPoint).
const crashPointEnv = "NBDSNAP_CRASHPOINT"

func newServeCommand(version string) *cobra.Command {
	o := &serveOptions{}
	cmd := &cobra.Command{
		Use:   "serve ORIGIN --name NAME",
		Short: "Run the daemon for one origin (block device or file)",
		Long: `Serve ORIGIN read-write as NBD export NAME (also the default export) and each
snapshot as a read-only export named after the snapshot. A block device is
opened exclusively (O_EXCL), so it cannot be mounted, or opened exclusively by
another program, behind the daemon's back; a plain writer such as dd is not
stopped, so every write must go through the daemon.

Snapshots are recorded in the state directory (default ` + DefaultStateRoot + `/NAME). At
start every recorded snapshot is settled before the origin takes a write:
reopened and served, or marked invalid for good if the origin would be
served without copy-on-write for it (its backing store missing or not its
own). A snapshot taken of another disk than the one now at ORIGIN's path is
not served; --accept-moved-origin says the origin moved (same data,
another device or path). --wait-stores waits for backing stores on file
systems mounted late. A rollback a stop interrupted is resumed before the
origin is served; if its snapshot's store cannot be reopened, the daemon
does not start (the origin would show a mix of old and restored blocks).

TLS: with --tls-cert and --tls-key every listener offers TLS
(NBD_OPT_STARTTLS); --tls=require, the default then, makes TCP listeners
refuse plain sessions, while unix sockets, guarded by their file mode, never
require it. --tls-ca requires a client certificate signed by it;
--tls-allow-origin and --tls-allow-snapshots limit the origin's or the
snapshots' exports to clients whose certificate names one of the IDs. A TCP
listener on an address other than loopback is refused without
--tls=require, unless --insecure-tcp.

--metrics-listen ADDR serves Prometheus metrics at http://ADDR/metrics, without
TLS or authentication (they are read-only; keep them on loopback or a trusted
network). The log warns once when a snapshot's store passes 80% and 95% of its
--max-size, and when the file system holding it has less than 5% (at most
1 GiB) free; nbdsnap status shows the space left.

SIGTERM or SIGINT: stop accepting, finish requests in flight, make every
snapshot durable, exit 0. A stop takes at most --stop-timeout and one second:
then each snapshot whose backing store has not caught up (a slow or stalled
disk) is marked invalid for good ("daemon stopped before the store caught
up"), the origin writes that waited for it complete and are answered, the
connections still busy are closed, and the daemon exits 3. Set systemd's
TimeoutStopSec above --stop-timeout. Readiness is reported to systemd
(Type=notify).`,
		Example: `  nbdsnap serve /dev/disk/by-id/virtio-data --name data
  nbdsnap serve disk.img --name data --state-dir /srv/nbdsnap/data --listen unix:/tmp/data.sock --listen tcp::10809
  nbdsnap serve /dev/vdb --name data --wait-stores 2m
  nbdsnap serve /dev/vdb --name data --listen tcp:0.0.0.0:10809 --tls-cert server-cert.pem \
      --tls-key server-key.pem --tls-ca ca-cert.pem --tls-allow-snapshots backup.example.com \
      --tls-allow-origin vmhost.example.com`,
		Args: oneArg("ORIGIN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, args[0], version)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.name, "name", "", "name of the daemon and of the origin's export (required)")
	f.StringArrayVar(&o.listen, "listen", nil, "NBD listen address, unix:PATH or tcp:HOST:PORT (repeatable; default unix:"+daemon.RunDir+"/NAME.sock; tcp without HOST is 127.0.0.1)")
	f.StringVar(&o.control, "control", "", "control socket path (default "+daemon.RunDir+"/NAME.ctl)")
	f.StringVar(&o.stateDir, "state-dir", "", "directory recording the snapshots (default "+DefaultStateRoot+"/NAME)")
	f.DurationVar(&o.waitStores, "wait-stores", 0, "at start, wait up to this long for missing backing stores to appear before serving the origin without them")
	f.BoolVar(&o.movedOrigin, "accept-moved-origin", false, "the origin moved to this path or device: serve snapshots whose recorded origin path or identity differs")
	f.Var(sizeFlag{&o.cacheSize}, "cache-size", "copy-on-write cache per snapshot (default "+formatSize(cow.DefaultCacheBytes)+")")
	f.Var(sizeFlag{&o.heldSize}, "held-size", "first writes under a persistent snapshot are answered at once and held, in a log next to the control socket, until their commit; a write that does not fit waits for its commit; 0 answers every first write after its commit (default "+formatSize(daemon.DefaultHeldBytes)+")")
	f.Var(sizeFlag{&o.reqMemory}, "request-memory", "request payloads in memory at once, all clients together; a client whose request does not fit waits (default "+formatSize(nbdsrv.DefaultMaxBytes)+")")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	f.DurationVar(&o.stopTimeout, "stop-timeout", 30*time.Second, "how long a stop (SIGTERM) waits for requests in flight and backing stores before it invalidates the snapshots whose store has not caught up and cuts connections (exit 3)")
	f.StringVar((*string)(&o.tls.Mode), "tls", "", "off, allow or require: require makes every TCP listener refuse plain sessions; unix sockets offer TLS but never require it (default require with --tls-cert, else off)")
	f.StringVar(&o.tls.CertFile, "tls-cert", "", "the server's TLS certificate, PEM")
	f.StringVar(&o.tls.KeyFile, "tls-key", "", "the private key of --tls-cert, PEM")
	f.StringVar(&o.tls.CAFile, "tls-ca", "", "PEM CA certificates: TLS clients must present a certificate one of them signed")
	f.StringArrayVar(&o.tls.AllowOrigin, "tls-allow-origin", nil, "only TLS clients whose certificate names this ID (CN or a SAN) may use the origin's export over TCP (repeatable; needs --tls-ca)")
	f.StringArrayVar(&o.tls.AllowSnapshots, "tls-allow-snapshots", nil, "only TLS clients whose certificate names this ID (CN or a SAN) may use the snapshots' exports over TCP (repeatable; needs --tls-ca)")
	f.StringVar(&o.metrics, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics; ADDR is HOST:PORT, or :PORT for 127.0.0.1 (default off)")
	f.BoolVar(&o.insecureTCP, "insecure-tcp", false, "allow a TCP listener on an address other than loopback without --tls=require")
	return cmd
}

// heldBytes is --held-size for the daemon: 0 when not given (the
// engine's default), negative for an explicit 0 (never hold).
func (o *serveOptions) heldBytes(cmd *cobra.Command) int64 {
	if cmd.Flags().Changed("held-size") && o.heldSize == 0 {
		return -1
	}
	return o.heldSize
}

func (o *serveOptions) logger(cmd *cobra.Command) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	hopts := &slog.HandlerOptions{Level: level}
	switch o.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), hopts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), hopts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", o.logFormat)
}

func (o *serveOptions) run(cmd *cobra.Command, origin, version string) error {
	if o.name == "" {
		return usagef("serve needs --name NAME")
	}
	if err := daemon.ValidName(o.name); err != nil {
		return usageError{fmt.Errorf("--name: %w", err)}
	}
	log, err := o.logger(cmd)
	if err != nil {
		return err
	}
	if o.waitStores < 0 {
		return usagef("--wait-stores must not be negative")
	}
	if o.heldSize > 0 && o.heldSize < cow.MinHeldLogSize {
		return usagef("--held-size must be 0 (no held writes) or at least %s", formatSize(cow.MinHeldLogSize))
	}
	if err := o.tls.Check(); err != nil {
		return usageError{err}
	}
	stateDir := o.stateDir
	if stateDir == "" {
		stateDir = filepath.Join(DefaultStateRoot, o.name)
	}
	ctx := cmd.Context()
	d, err := daemon.Start(ctx, daemon.Config{
		Name:              o.name,
		Origin:            origin,
		Listen:            o.listen,
		Control:           o.control,
		StateDir:          stateDir,
		CacheBytes:        o.cacheSize,
		HeldBytes:         o.heldBytes(cmd),
		RequestMemory:     o.reqMemory,
		WaitStores:        o.waitStores,
		AcceptMovedOrigin: o.movedOrigin,
		TLS:               o.tls,
		InsecureTCP:       o.insecureTCP,
		MetricsListen:     o.metrics,
		CrashPoint:        os.Getenv(crashPointEnv),
		Version:           version,
		Logger:            log,
	})
	if err != nil {
		return err
	}
	var failed error
	select {
	case <-ctx.Done():
		log.Info("signal received, shutting down")
	case failed = <-d.Failed():
		log.Error("listener failed, shutting down", "err", failed)
	}
	// Past --stop-timeout the daemon forces the stop and returns within a
	// second (daemon.ErrStopForced, exit code ExitStopForced), so that the
	// stop ends before systemd's TimeoutStopSec kills it.
	sctx, cancel := context.WithTimeout(context.Background(), o.stopTimeout)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		if failed != nil {
			return failed // the daemon failed: exit 1; the shutdown is logged
		}
		return fmt.Errorf("shutdown: %w", err)
	}
	return failed
}
