package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	sdaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/devinfo"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// Daemon serves one origin and its snapshots. Start it with [Start], stop
// it with [Daemon.Shutdown].
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	originF *os.File // holds the O_EXCL open or the flock
	ident   devinfo.Identity
	engine  *cow.Engine
	heldLog *cow.HeldLog // the engine's held-writes log; nil when writes are not held
	srv     *nbdsrv.Server
	state   *stateDir
	started time.Time
	// origin's record in the state directory; its Session is the last
	// session that served the origin once reopenAll ran.
	origin  originRecord
	session uint64 // this daemon's session number (state.go)

	listeners []net.Listener
	addrs     []string     // what Status reports, one per listener
	unixPaths []string     // socket files to remove on shutdown
	ctlL      net.Listener // the control socket
	ctl       *http.Server
	ctlPath   string

	failed chan error // a listener died; buffered, first error wins

	// metrics, metricsL and metricsSrv serve /metrics (metrics.go);
	// metricsL is nil without Config.MetricsListen.
	metrics    *metrics
	metricsL   net.Listener
	metricsSrv *http.Server
	// spaces is the store space watch's state per snapshot (space.go),
	// guarded by mu; spaceDone stops the watch.
	spaces    map[string]*spaceState
	spaceDone chan struct{}

	// ops (a lock of one token, lockOps/unlockOps) serialises Create and
	// Clear with each other, so that the check "name is free" and the act
	// of taking it cannot interleave with another operation on the same
	// name. A channel rather than a mutex, so that a create whose client
	// gives up stops waiting for it.
	ops chan struct{}
	// mu guards snaps; it is held only briefly, never across I/O, so that
	// Status answers while a Create is under way.
	mu    sync.Mutex
	snaps map[string]*entry
	// starting, while not empty, is what the starting daemon is doing;
	// the control API answers ErrUnavailable with it (guarded by mu).
	starting string

	// resumeUUID is, while the daemon starts, the store of the snapshot a
	// rollback under way restores from (reopenAll).
	resumeUUID string
	// lastRollback is the last rollback this daemon finished, or is
	// finishing (watchRollback), for Status (guarded by mu).
	lastRollback *control.RollbackStatus
	// bg runs background work that ends when the daemon closes
	// (watchRollback): closeAll cancels bgCtx and waits for it.
	bg       sync.WaitGroup
	bgCtx    context.Context
	bgCancel context.CancelFunc

	shutdownOnce sync.Once
	shutdownErr  error
}

// entry is one snapshot the daemon knows of.
type entry struct {
	rec  snapRecord
	snap *cow.Snapshot // nil when it could not be reopened after a restart
	// served: the snapshot's NBD export exists.
	served bool
	// gone explains why snap is nil.
	gone string
	// damaged: the record file (file) could not be read; rec holds only
	// the name.
	damaged error
	file    string
}

func (d *Daemon) lockOps(ctx context.Context) error {
	select {
	case d.ops <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (d *Daemon) unlockOps() { <-d.ops }

// setStarting records what the starting daemon is doing; "" once it
// serves.
func (d *Daemon) setStarting(what string) {
	d.mu.Lock()
	d.starting = what
	d.mu.Unlock()
}

// ready fails with ErrUnavailable while the daemon is starting.
func (d *Daemon) ready() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.starting != "" {
		return fmt.Errorf("%w: the daemon is starting: %s", control.ErrUnavailable, d.starting)
	}
	return nil
}

// crashpoint kills the daemon with SIGKILL when Config.CrashPoint names
// point: the tests' way to crash it at each step of create and clear.
func (d *Daemon) crashpoint(point string) {
	if d.cfg.CrashPoint != point {
		return
	}
	d.log.Warn("crash point reached: killing the daemon", "point", point)
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {}
}

// Start opens the origin, reopens the snapshots recorded in the state
// directory, listens on every address and serves. When Start returns nil
// the daemon is serving and systemd has been told READY=1. On error nothing
// is left open and no socket file is left behind.
func Start(ctx context.Context, cfg Config) (_ *Daemon, err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := ValidName(cfg.Name); err != nil {
		return nil, fmt.Errorf("daemon %w", err)
	}
	origin, err := filepath.Abs(cfg.Origin)
	if err != nil {
		return nil, fmt.Errorf("origin: %w", err)
	}
	cfg.Origin = origin
	if cfg.StateDir == "" {
		return nil, errors.New("daemon: a state directory is required: it is what lets a restart tell a snapshot it may serve from one it may not")
	}
	if cfg.StateDir, err = filepath.Abs(cfg.StateDir); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if len(cfg.Listen) == 0 {
		cfg.Listen = []string{"unix:" + DefaultSocketPath(cfg.Name)}
	}
	var addrs []listenAddr
	for _, s := range cfg.Listen {
		a, err := parseListen(s)
		if err != nil {
			return nil, err
		}
		addrs = append(addrs, a)
	}
	if cfg.Control == "" {
		cfg.Control = control.DefaultPath(cfg.Name)
	}
	var metricsAddr listenAddr
	if cfg.MetricsListen != "" {
		if metricsAddr, err = parseMetricsListen(cfg.MetricsListen); err != nil {
			return nil, err
		}
	}
	tlsCfg, err := cfg.TLS.load()
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if err := cfg.TLS.checkExposure(ctx, a, cfg.InsecureTCP); err != nil {
			return nil, err
		}
	}

	d := &Daemon{
		cfg:     cfg,
		log:     log,
		ctlPath: cfg.Control,
		snaps:   make(map[string]*entry),
		ops:     make(chan struct{}, 1),
		failed:  make(chan error, 1),
		started: time.Now(),
		spaces:  make(map[string]*spaceState),
	}
	d.bgCtx, d.bgCancel = context.WithCancel(context.Background())
	d.metrics = newMetrics(d)
	// Undo whatever was set up if a later step fails.
	defer func() {
		if err != nil {
			d.closeAll()
		}
	}()

	f, vf, err := openOrigin(cfg.Origin)
	if err != nil {
		return nil, err
	}
	d.originF = f
	if d.ident, err = devinfo.Of(f); err != nil {
		return nil, fmt.Errorf("origin %s: %w", cfg.Origin, err)
	}
	// Bind every socket before the state directory is touched, so that a
	// daemon refused for a taken address leaves no trace. Nothing is served
	// until the engine and the exports exist.
	for _, a := range addrs {
		l, err := listen(a)
		if err != nil {
			return nil, err
		}
		d.listeners = append(d.listeners, l)
		if a.network == "unix" {
			d.unixPaths = append(d.unixPaths, a.addr)
			d.addrs = append(d.addrs, a.String())
		} else {
			d.addrs = append(d.addrs, "tcp:"+l.Addr().String())
		}
	}
	if cfg.MetricsListen != "" {
		if d.metricsL, err = listen(metricsAddr); err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}
	d.ctlL, err = listenUnix(cfg.Control, 0o600)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	d.unixPaths = append(d.unixPaths, cfg.Control)
	d.state, d.origin, err = openState(cfg.StateDir, cfg.Origin, cfg.AcceptMovedOrigin)
	if err != nil {
		return nil, err
	}
	d.engine, err = cow.NewEngine(vf, cow.EngineOptions{Logger: log, RecordInvalid: d.recordInvalid})
	if err != nil {
		return nil, fmt.Errorf("origin %s: %w", cfg.Origin, err)
	}
	srvCfg := nbdsrv.Config{Logger: log, MaxBytes: cfg.RequestMemory, TLS: tlsCfg}
	if cfg.MetricsListen != "" {
		// Per-request counting (label lookups, two clock reads) only
		// where somebody scrapes it.
		srvCfg.Observe = d.metrics.observe
	}
	d.srv = nbdsrv.NewServer(srvCfg)
	if err := d.srv.AddExport(nbdsrv.Export{
		Name:        cfg.Name,
		Description: "nbdsnap origin " + cfg.Name, // no path: clients on the network read it
		Allow:       allow(cfg.TLS.AllowOrigin),
		Size:        d.engine.Size(),
		Backend:     originBackend{d.engine},
		MetaContexts: func() []nbdsrv.MetaContext {
			return dirtyContexts(d.engine.Tracked(), d.engine.ChangedSince)
		},
		// Every answered write is seen by reads on every connection (a
		// held write is waited for, cow's held.go), and a flush on any
		// connection makes every write answered before it durable.
		MultiConn: true,
	}); err != nil {
		return nil, fmt.Errorf("export origin: %w", err)
	}
	d.srv.SetDefaultExport(cfg.Name)

	// The control socket answers from here on, "starting" until the
	// snapshots are settled (which may wait for late stores), so that a
	// client asking meanwhile is told why rather than left hanging.
	d.ctl = &http.Server{
		Handler:           control.NewHandler(d, cfg.Version, log),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	d.setStarting("settling its snapshots")
	go func() {
		if err := d.ctl.Serve(d.ctlL); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.fail(fmt.Errorf("control socket %s: %w", cfg.Control, err))
		}
	}()
	// Every snapshot is settled (reopened, or durably invalid) before the
	// origin takes its first write.
	if err := d.reopenAll(ctx); err != nil {
		return nil, err
	}
	if err := d.replayHeld(ctx); err != nil {
		return nil, err
	}
	d.watchRollback()
	d.setStarting("")

	setIOFlusher(log)
	for _, l := range d.listeners {
		go func() {
			if err := d.srv.ServeMode(l, cfg.TLS.listenMode(l)); err != nil && !errors.Is(err, nbdsrv.ErrServerClosed) {
				d.fail(fmt.Errorf("nbd listener %s: %w", l.Addr(), err))
			}
		}()
	}
	if d.metricsL != nil {
		d.serveMetrics(d.metricsL)
	}
	d.spaceDone = make(chan struct{})
	go d.watchSpace(cmp.Or(cfg.SpaceInterval, defaultSpaceInterval), d.spaceDone)
	log.Info("serving", "name", cfg.Name, "origin", cfg.Origin, "size", d.engine.Size(),
		"origin_identity", d.ident.String(), "session", d.session,
		"listen", d.addrs, "metrics", d.MetricsAddr(), "tls", cfg.TLS.mode(), "control", cfg.Control, "state_dir", cfg.StateDir)
	if d.ident.Weak() {
		log.Warn("the origin has no stable identifier (no serial, WWID or other kernel name): a restart cannot tell another device of the same size at its path from it",
			"origin", cfg.Origin)
	}
	notify(log, sdaemon.SdNotifyReady)
	return d, nil
}

// Failed delivers the error of a listener that stopped on its own; the
// daemon should then be shut down.
func (d *Daemon) Failed() <-chan error { return d.failed }

func (d *Daemon) fail(err error) {
	select {
	case d.failed <- err:
	default:
	}
}

// Addrs are the NBD listen addresses (TCP ones with the port the kernel
// chose for port 0).
func (d *Daemon) Addrs() []string { return d.addrs }

// MetricsAddr is the /metrics listener's address, HOST:PORT ("" without
// Config.MetricsListen).
func (d *Daemon) MetricsAddr() string {
	if d.metricsL == nil {
		return ""
	}
	return d.metricsL.Addr().String()
}

// ControlPath is the control socket's path.
func (d *Daemon) ControlPath() string { return d.ctlPath }

// Shutdown stops the daemon the way SIGTERM asks: it stops accepting
// control requests and NBD connections, lets in-flight requests finish,
// makes everything durable (the engine commits every copied cluster of every
// persistent snapshot and syncs the origin), releases the origin and removes
// its socket files. If ctx ends first (--stop-timeout), the stop is forced
// (stop.go): snapshots whose store has not caught up are invalidated, the
// requests that waited for them answered, what is left cut, and Shutdown
// returns at most exitGrace later with an error matching ErrStopForced.
// Later calls return the first call's result.
func (d *Daemon) Shutdown(ctx context.Context) error {
	d.shutdownOnce.Do(func() {
		d.shutdownErr = d.shutdown(ctx)
		switch {
		case errors.Is(d.shutdownErr, ErrStopForced):
			d.log.Error("stop forced", "err", d.shutdownErr)
		case d.shutdownErr != nil:
			d.log.Error("shutdown", "err", d.shutdownErr)
		default:
			d.log.Info("stopped cleanly")
		}
	})
	return d.shutdownErr
}

// closeAll releases what Start acquired, in reverse order; it is also the
// cleanup of a failed Start. The listeners must already be shut down or
// never served.
func (d *Daemon) closeAll() error {
	var errs []error
	for _, l := range d.listeners {
		l.Close()
	}
	if d.spaceDone != nil {
		close(d.spaceDone)
	}
	// Scrapes are short reads: closing under one is harmless.
	if d.metricsSrv != nil {
		d.metricsSrv.Close()
	} else if d.metricsL != nil {
		d.metricsL.Close()
	}
	if d.ctl != nil {
		d.ctl.Close() // a failed Start's; after Shutdown it has nothing left to close
	}
	if d.ctlL != nil {
		d.ctlL.Close() // already closed when the control server ran
	}
	d.bgCancel()
	d.bg.Wait()
	engineClosed := false
	if d.engine != nil {
		if err := d.engine.Close(); err != nil {
			errs = append(errs, fmt.Errorf("engine: %w", err))
		} else {
			engineClosed = true
		}
	}
	if d.heldLog != nil {
		// After the engine, which drained the held writes into the
		// origin. A log with nothing left to replay is removed, which
		// gives its tmpfs pages back; otherwise the next start replays it.
		drained := engineClosed && d.engine.Held().Writes == 0
		if err := d.heldLog.Close(); err != nil {
			errs = append(errs, fmt.Errorf("held-writes log: %w", err))
		}
		if drained {
			if err := os.Remove(heldLogPath(d.cfg.Control, d.cfg.Name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("held-writes log: %w", err))
			}
		}
	}
	if d.originF != nil {
		if err := d.originF.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, fmt.Errorf("origin: %w", err))
		}
	}
	for _, p := range d.unixPaths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
