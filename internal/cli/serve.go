package cli

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/daemon"
)

type serveOptions struct {
	name        string
	listen      []string
	control     string
	stateDir    string
	cacheSize   int64
	logLevel    string
	logFormat   string
	stopTimeout time.Duration
}

func newServeCommand(version string) *cobra.Command {
	o := &serveOptions{}
	cmd := &cobra.Command{
		Use:   "serve ORIGIN --name NAME",
		Short: "Run the daemon for one origin (block device or file)",
		Long: `Serve ORIGIN read-write as NBD export NAME (also the default export) and each
snapshot as a read-only export named after the snapshot. A block device is
opened exclusively (O_EXCL), so it cannot be mounted behind the daemon's back.

SIGTERM or SIGINT: stop accepting, finish requests in flight, make every
snapshot durable, exit 0. Readiness is reported to systemd (Type=notify).`,
		Example: `  nbdsnap serve /dev/vdb --name data --state-dir /var/lib/nbdsnap/data
  nbdsnap serve disk.img --name data --listen unix:/tmp/data.sock --listen tcp::10809`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, args[0], version)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.name, "name", "", "name of the daemon and of the origin's export (required)")
	f.StringArrayVar(&o.listen, "listen", nil, "NBD listen address, unix:PATH or tcp:HOST:PORT (repeatable; default unix:"+daemon.RunDir+"/NAME.sock; tcp without HOST is 127.0.0.1)")
	f.StringVar(&o.control, "control", "", "control socket path (default "+daemon.RunDir+"/NAME.ctl)")
	f.StringVar(&o.stateDir, "state-dir", "", "directory recording persistent snapshots, reopened after a restart")
	f.Var(sizeFlag{&o.cacheSize}, "cache-size", "copy-on-write cache per snapshot (default "+formatSize(cow.DefaultCacheBytes)+")")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	f.DurationVar(&o.stopTimeout, "stop-timeout", 30*time.Second, "how long SIGTERM waits for requests in flight before cutting them")
	return cmd
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
	ctx := cmd.Context()
	d, err := daemon.Start(ctx, daemon.Config{
		Name:       o.name,
		Origin:     origin,
		Listen:     o.listen,
		Control:    o.control,
		StateDir:   o.stateDir,
		CacheBytes: o.cacheSize,
		Version:    version,
		Logger:     log,
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
	sctx, cancel := context.WithTimeout(context.Background(), o.stopTimeout)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if failed != nil {
		return failed
	}
	return nil
}
