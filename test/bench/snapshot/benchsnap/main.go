// Command benchsnap runs nbdsnap side by side with nbdkit and QEMU image
// fleecing and writes results.md, chart.png and raw.json to -out.
// It is run by test/bench/scenarios.d/snapshot.sh under `make bench`, and
// with tiny sizes by the smoke test in `make test`.
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type config struct {
	nbdsnap        string
	runs           int
	fio            fioParams
	passSize       int64 // bytes a first-write pass covers
	clusterSize    int64
	locs           []location
	restartLocs    map[string]bool
	restartCluster int64
	restartCount   int64
	createSamples  int
	out            string
	log            *slog.Logger
}

// location is where an origin and its stores live (tmpfs or a disk).
type location struct {
	name, base string
	dir        string // this run's scratch directory under base
	origin     string
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	c := config{log: log, restartLocs: map[string]bool{}}
	var locs, restartLocs, size, pass string
	flag.StringVar(&c.nbdsnap, "nbdsnap", "bin/nbdsnap", "nbdsnap binary")
	flag.IntVar(&c.runs, "runs", 3, "runs of every scenario (the table shows medians)")
	flag.IntVar(&c.fio.runtime, "runtime", 10, "seconds per timed fio run; 0 = one pass over the file")
	flag.IntVar(&c.fio.cap, "pass-cap", 60, "seconds a first-write pass may take at most")
	flag.StringVar(&size, "size", "1G", "origin size (bytes, or with K, M, G)")
	flag.StringVar(&pass, "pass-size", "512M", "bytes of the origin each first-write pass covers (at most -size)")
	flag.Int64Var(&c.clusterSize, "cluster-size", 64<<10, "nbdsnap cluster size (QEMU's copy-before-write copies 64 KiB)")
	flag.StringVar(&locs, "locations", "shm=/dev/shm,disk=/var/tmp", "NAME=DIR,... where origins and stores live")
	flag.StringVar(&restartLocs, "restart-locations", "", "locations where the restart with -restart-clusters is measured (default: the first)")
	flag.Int64Var(&c.restartCount, "restart-clusters", 1000000, "copied clusters in the restart measurement")
	flag.Int64Var(&c.restartCluster, "restart-cluster-size", 4096, "cluster size of the restart measurement")
	flag.IntVar(&c.createSamples, "create-samples", 20, "creates timed for the create latency")
	flag.StringVar(&c.out, "out", "", "results directory (required)")
	flag.Parse()
	var err error
	if c.fio.size, err = parseSize(size); err != nil {
		fatal(log, err)
	}
	if c.passSize, err = parseSize(pass); err != nil {
		fatal(log, err)
	}
	c.passSize = min(c.passSize, c.fio.size)
	c.passSize -= c.passSize % c.clusterSize
	if c.out == "" || c.runs < 1 || c.passSize <= 0 {
		fatal(log, fmt.Errorf("need -out, -runs >= 1 and -pass-size of at least one cluster"))
	}
	for _, l := range strings.Split(locs, ",") {
		name, dir, ok := strings.Cut(l, "=")
		if !ok {
			fatal(log, fmt.Errorf("-locations %q: want NAME=DIR", l))
		}
		c.locs = append(c.locs, location{name: name, base: dir})
	}
	if restartLocs == "" {
		restartLocs = c.locs[0].name
	}
	for _, l := range strings.Split(restartLocs, ",") {
		c.restartLocs[l] = true
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, &c); err != nil {
		fatal(log, err)
	}
}

func fatal(log *slog.Logger, err error) {
	log.Error("benchsnap", "err", err)
	os.Exit(1)
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	n, err := strconv.ParseInt(strings.TrimRight(s, "KMG"), 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M or G", s)
	}
	return n * mult, nil
}

// The workloads. Columns of the table: which server produced a sample.
const (
	colKit  = "nbdkit"
	colQemu = "qemu"
	colSnap = "nbdsnap"   // no snapshot, or persistent snapshots
	colTr   = "nbdsnap-t" // transient snapshots
)

var proxyJobs = []job{
	{id: "proxy-4k-randread", title: "proxy, no snapshot: 4k randread QD32", unit: "IOPS",
		args: []string{"--rw=randread", "--bs=4k", "--iodepth=32"}},
	{id: "proxy-4k-randwrite", title: "proxy, no snapshot: 4k randwrite QD32", unit: "IOPS",
		args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=32"}},
	{id: "proxy-1M-read", title: "proxy, no snapshot: 1M seq read QD8", unit: "MiB/s",
		args: []string{"--rw=read", "--bs=1M", "--iodepth=8"}},
	{id: "proxy-1M-write", title: "proxy, no snapshot: 1M seq write QD8", unit: "MiB/s",
		args: []string{"--rw=write", "--bs=1M", "--iodepth=8"}},
}

// passJobs write every cluster of the first passSize bytes once: 4k writes
// at the start of each cluster (a sequential pass that skips the rest of the
// cluster), 64 KiB writes in random order with fio's random map (each block
// once). Run on a fresh snapshot they are first writes; run again, rewrites.
func passJobs(c *config) []job {
	n := strconv.FormatInt(c.passSize, 10)
	skip := strconv.FormatInt(c.clusterSize-4096, 10)
	io4k := strconv.FormatInt(c.passSize/c.clusterSize*4096, 10)
	var js []job
	for _, qd := range []string{"1", "32"} {
		js = append(js, job{id: "4k-qd" + qd, title: "4k write QD" + qd + ", one per cluster", unit: "IOPS", pass: true,
			args: []string{"--rw=write:" + skip, "--bs=4k", "--iodepth=" + qd, "--size=" + n, "--io_size=" + io4k}})
	}
	for _, qd := range []string{"1", "32"} {
		js = append(js, job{id: "64k-qd" + qd, title: "64K randwrite QD" + qd + ", random map", unit: "MiB/s", pass: true,
			args: []string{"--rw=randwrite", "--bs=64k", "--iodepth=" + qd, "--size=" + n}})
	}
	return js
}

func snapReadJob(c *config) job {
	return job{id: "snap-read", title: "snapshot export: 1M seq read QD8 of copied clusters", unit: "MiB/s",
		args: []string{"--rw=read", "--bs=1M", "--iodepth=8", "--size=" + strconv.FormatInt(c.passSize, 10)}}
}

// results holds every sample; key: location, scenario id, column.
type results struct {
	Samples map[string]map[string]map[string][]float64 `json:"samples"`
	// Memory: peak RSS (VmHWM, KiB) per location and server after the
	// 64K QD32 first-write, rewrite and snapshot read, and ("proxy-" +
	// server) after the proxy jobs; the largest over the runs.
	MemKiB  map[string]map[string]int64 `json:"mem_kib"`
	Create  map[string]createResult     `json:"create"`
	Restart map[string]restartResult    `json:"restart"`
	Checks  []string                    `json:"checks"`
	// LoadSamples: /proc/loadavg's 1/5/15-minute averages every 30 s.
	LoadSamples []string          `json:"load_samples"`
	Machine     map[string]string `json:"machine"`
	Config      map[string]string `json:"config"`
}

type createResult struct {
	WallMS  []float64 `json:"wall_ms"`  // `nbdsnap create` command, start to exit
	PauseUS []float64 `json:"pause_us"` // create_pause_us: origin writes held
}

type restartResult struct {
	Clusters       int64     `json:"clusters"`
	ClusterSize    int64     `json:"cluster_size"`
	FillSeconds    float64   `json:"fill_seconds"`
	ReadyMS        []float64 `json:"ready_ms"`        // exec to READY=1, 1 persistent snapshot
	EmptyReadyMS   []float64 `json:"empty_ready_ms"`  // exec to READY=1, no snapshot
	RSSKiB         int64     `json:"rss_kib"`         // after the last restart
	ClustersCopied int64     `json:"clusters_copied"` // as reported after the restart
	StoreBytes     int64     `json:"store_bytes"`     // backing file size
	ShutdownMS     []float64 `json:"shutdown_ms"`     // SIGTERM to exit
}

func (r *results) add(loc, id, col string, v float64) {
	if r.Samples[loc] == nil {
		r.Samples[loc] = map[string]map[string][]float64{}
	}
	if r.Samples[loc][id] == nil {
		r.Samples[loc][id] = map[string][]float64{}
	}
	r.Samples[loc][id][col] = append(r.Samples[loc][id][col], v)
}

func run(ctx context.Context, c *config) error {
	res := &results{
		Samples: map[string]map[string]map[string][]float64{},
		MemKiB:  map[string]map[string]int64{},
		Create:  map[string]createResult{},
		Restart: map[string]restartResult{},
		Config: map[string]string{
			"runs": strconv.Itoa(c.runs), "size": strconv.FormatInt(c.fio.size, 10),
			"runtime_s": strconv.Itoa(c.fio.runtime), "pass_size": strconv.FormatInt(c.passSize, 10),
			"cluster_size": strconv.FormatInt(c.clusterSize, 10),
		},
	}
	res.Machine = describeMachine(c)
	// The load average over the run, sampled every 30 s: numbers taken
	// while other work ran are not comparable.
	loadCtx, stopLoad := context.WithCancel(ctx)
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		for {
			select {
			case <-loadCtx.Done():
				return
			case <-time.After(30 * time.Second):
				res.LoadSamples = append(res.LoadSamples, loadAvg())
			}
		}
	}()
	defer func() { stopLoad(); <-loadDone }()
	for i := range c.locs {
		l := &c.locs[i]
		d, err := os.MkdirTemp(l.base, "nbdsnap-snapbench.")
		if err != nil {
			return fmt.Errorf("location %s: %w", l.name, err)
		}
		defer os.RemoveAll(d)
		l.dir = d
		l.origin = filepath.Join(d, "origin.img")
		c.log.Info("writing origin", "location", l.name, "path", l.origin, "size", c.fio.size)
		if err := randomFile(l.origin, c.fio.size); err != nil {
			return err
		}
	}
	for r := 1; r <= c.runs; r++ {
		for _, l := range c.locs {
			c.log.Info("run", "n", r, "location", l.name)
			if err := proxyPhase(ctx, c, l, res); err != nil {
				return err
			}
			if err := firstWritePhase(ctx, c, l, res, r == 1); err != nil {
				return err
			}
		}
	}
	for _, l := range c.locs {
		cr, err := createLatency(ctx, c, l)
		if err != nil {
			return err
		}
		res.Create[l.name] = cr
		if c.restartLocs[l.name] {
			rr, err := restartTime(ctx, c, l)
			if err != nil {
				return err
			}
			res.Restart[l.name] = rr
		}
	}
	stopLoad()
	<-loadDone
	res.Machine["load_end"] = loadAvg()
	return writeReport(c, res)
}

// randomFile writes size random bytes: a sparse or zero origin would let
// a server answer with holes and measure nothing.
func randomFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("origin: %w", err)
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		f.Close()
		return fmt.Errorf("origin: %w", err)
	}
	return f.Close()
}

func proxyPhase(ctx context.Context, c *config, l location, res *results) error {
	starts := []struct {
		col   string
		start func() (*server, error)
	}{
		{colKit, func() (*server, error) { return startNbdkit(ctx, l.dir, l.origin) }},
		{colQemu, func() (*server, error) { return startQemu(ctx, l.dir, l.origin, c.fio.size, false) }},
		{colSnap, func() (*server, error) {
			return startNbdsnap(ctx, l.dir, l.origin, nbdsnapOpts{bin: c.nbdsnap})
		}},
	}
	for _, st := range starts {
		s, err := st.start()
		if err != nil {
			return err
		}
		for _, j := range proxyJobs {
			v, err := runFio(ctx, s.origin, j, c.fio)
			if err != nil {
				s.stop()
				return err
			}
			c.log.Info("sample", "location", l.name, "scenario", j.id, "server", st.col, "value", v, "unit", j.unit)
			res.add(l.name, j.id, st.col, v)
		}
		_, hwm := s.memKiB()
		if res.MemKiB[l.name] == nil {
			res.MemKiB[l.name] = map[string]int64{}
		}
		res.MemKiB[l.name]["proxy-"+st.col] = max(res.MemKiB[l.name]["proxy-"+st.col], hwm)
		if err := s.stop(); err != nil {
			return err
		}
	}
	return nil
}

// variant is a server set up with snapshots for the first-write pass: its
// column, how many fresh snapshots, and the suffix of its scenario id.
type variant struct {
	col       string
	snapshots int
	id        string
}

// firstWritePhase runs each pass job on servers started afresh: without a
// snapshot (the baseline), then on a snapshot taken at the start, twice
// (first writes, then rewrites of the clusters now copied). After the 64K
// QD32 pair it reads the snapshot and, when verify is set, proves that the
// snapshot still holds the origin's old contents: a server that does not
// copy would be fast for nothing.
func firstWritePhase(ctx context.Context, c *config, l location, res *results, verify bool) error {
	read := snapReadJob(c)
	for _, j := range passJobs(c) {
		last := j.id == "64k-qd32"
		for _, col := range []string{colQemu, colSnap} {
			var s *server
			var err error
			if col == colQemu {
				s, err = startQemu(ctx, l.dir, l.origin, c.fio.size, false)
			} else {
				s, err = startNbdsnap(ctx, l.dir, l.origin, nbdsnapOpts{bin: c.nbdsnap})
			}
			if err != nil {
				return err
			}
			v, err := runFio(ctx, s.origin, j, c.fio)
			if err != nil {
				s.stop()
				return err
			}
			c.log.Info("sample", "location", l.name, "scenario", j.id+"/nosnap", "server", col, "value", v)
			res.add(l.name, j.id+"/nosnap", col, v)
			if err := s.stop(); err != nil {
				return err
			}
		}
		variants := []variant{{colQemu, 1, ""}, {colSnap, 1, ""}, {colTr, 1, ""}}
		if last {
			variants = append(variants, variant{colSnap, 4, "/4snap"}, variant{colTr, 4, "/4snap"})
		}
		for _, vr := range variants {
			var before string
			if verify && last && vr.snapshots == 1 {
				var err error
				if before, err = fileHash(l.origin); err != nil {
					return err
				}
			}
			var s *server
			var err error
			if vr.col == colQemu {
				s, err = startQemu(ctx, l.dir, l.origin, c.fio.size, true)
			} else {
				s, err = startNbdsnap(ctx, l.dir, l.origin, nbdsnapOpts{bin: c.nbdsnap,
					snapshots: vr.snapshots, transient: vr.col == colTr, clusterSize: c.clusterSize})
			}
			if err != nil {
				return err
			}
			err = func() error {
				v, err := runFio(ctx, s.origin, j, c.fio)
				if err != nil {
					return err
				}
				c.log.Info("sample", "location", l.name, "scenario", j.id+"/first"+vr.id, "server", vr.col, "value", v)
				res.add(l.name, j.id+"/first"+vr.id, vr.col, v)
				if vr.snapshots > 1 {
					return checkValid(ctx, c, s, vr.snapshots)
				}
				if v, err = runFio(ctx, s.origin, j, c.fio); err != nil {
					return err
				}
				c.log.Info("sample", "location", l.name, "scenario", j.id+"/rewrite", "server", vr.col, "value", v)
				res.add(l.name, j.id+"/rewrite", vr.col, v)
				if last {
					if v, err = runFio(ctx, s.snaps[0], read, c.fio); err != nil {
						return err
					}
					c.log.Info("sample", "location", l.name, "scenario", read.id, "server", vr.col, "value", v)
					res.add(l.name, read.id, vr.col, v)
					_, hwm := s.memKiB()
					if res.MemKiB[l.name] == nil {
						res.MemKiB[l.name] = map[string]int64{}
					}
					res.MemKiB[l.name][vr.col] = max(res.MemKiB[l.name][vr.col], hwm)
				}
				if before != "" {
					got, err := exportHash(ctx, s.snaps[0])
					if err != nil {
						return err
					}
					if got != before {
						return fmt.Errorf("%s (%s): the snapshot export does not hold the origin's contents at the snapshot instant after the writes: sha256 %s, want %s", vr.col, l.name, got, before)
					}
				}
				if s.ctl != "" {
					return checkValid(ctx, c, s, vr.snapshots)
				}
				return nil
			}()
			if err != nil {
				s.stop()
				return err
			}
			if err := s.stop(); err != nil {
				return err
			}
			if before != "" {
				after, err := fileHash(l.origin)
				if err != nil {
					return err
				}
				if after == before {
					return fmt.Errorf("%s (%s): the origin file did not change under the write passes; the check proves nothing", vr.col, l.name)
				}
				msg := fmt.Sprintf("%s, %s: after %s first writes and rewrites over %d bytes, the snapshot export read back with nbdcopy has the origin's SHA-256 from before the snapshot (%.12s…), and the origin file changed",
					vr.col, l.name, j.title, c.passSize, before)
				c.log.Info("check passed", "msg", msg)
				res.Checks = append(res.Checks, msg)
			}
		}
	}
	return nil
}

// checkValid fails when an nbdsnap snapshot turned invalid under the load:
// its numbers would not measure copy-on-write.
func checkValid(ctx context.Context, c *config, s *server, want int) error {
	st, err := s.status(ctx, c.nbdsnap)
	if err != nil {
		return err
	}
	if len(st.Snapshots) != want {
		return fmt.Errorf("%s: %d snapshots, want %d", s.kind, len(st.Snapshots), want)
	}
	for _, sn := range st.Snapshots {
		if sn.State != "valid" {
			return fmt.Errorf("%s: snapshot %s is %s: %s", s.kind, sn.Name, sn.State, sn.Reason)
		}
	}
	return nil
}

// createLatency times createSamples persistent creates (each cleared
// before the next) on a daemon serving the location's origin, after a
// short burst of writes so that the create's origin sync has work to do.
func createLatency(ctx context.Context, c *config, l location) (createResult, error) {
	var cr createResult
	s, err := startNbdsnap(ctx, l.dir, l.origin, nbdsnapOpts{bin: c.nbdsnap})
	if err != nil {
		return cr, err
	}
	defer s.stop()
	burst := job{id: "burst", unit: "MiB/s", pass: true,
		args: []string{"--rw=randwrite", "--bs=64k", "--iodepth=8", "--size=" + strconv.FormatInt(min(c.fio.size, 8<<20), 10)}}
	for i := 0; i < c.createSamples; i++ {
		if _, err := runFio(ctx, s.origin, burst, c.fio); err != nil {
			return cr, err
		}
		d, err := s.create(ctx, c.nbdsnap, "lat", false, c.clusterSize)
		if err != nil {
			return cr, err
		}
		st, err := s.status(ctx, c.nbdsnap)
		if err != nil {
			return cr, err
		}
		if len(st.Snapshots) != 1 {
			return cr, fmt.Errorf("create latency: %d snapshots after create, want 1", len(st.Snapshots))
		}
		cr.WallMS = append(cr.WallMS, float64(d.Microseconds())/1000)
		cr.PauseUS = append(cr.PauseUS, float64(st.Snapshots[0].CreatePauseUS))
		if err := s.clear(ctx, c.nbdsnap, "lat"); err != nil {
			return cr, err
		}
	}
	c.log.Info("create latency", "location", l.name, "wall_ms", cr.WallMS, "pause_us", cr.PauseUS)
	return cr, nil
}

// restartTime fills a persistent snapshot with restartCount copied
// clusters, then times daemon start to READY=1 (sd_notify, sent after
// every recorded snapshot is reopened) over three restarts.
func restartTime(ctx context.Context, c *config, l location) (restartResult, error) {
	rr := restartResult{Clusters: c.restartCount, ClusterSize: c.restartCluster}
	dir, err := os.MkdirTemp(l.dir, "restart.")
	if err != nil {
		return rr, fmt.Errorf("restart: %w", err)
	}
	defer os.RemoveAll(dir)
	origin := filepath.Join(dir, "origin.img")
	size := c.restartCount * c.restartCluster
	// Sparse: the copies are what is measured, not the origin's contents.
	if err := os.WriteFile(origin, nil, 0o600); err != nil {
		return rr, fmt.Errorf("restart origin: %w", err)
	}
	if err := os.Truncate(origin, size); err != nil {
		return rr, fmt.Errorf("restart origin: %w", err)
	}
	sock, ctl, state := filepath.Join(dir, "s"), filepath.Join(dir, "c"), filepath.Join(dir, "state")
	start := func() (*exec.Cmd, time.Duration, error) {
		return startNotified(ctx, c.nbdsnap, "serve", origin, "--name", "r", "--listen", "unix:"+sock,
			"--control", ctl, "--state-dir", state, "--log-level", "error")
	}
	for i := 0; i < 3; i++ {
		cmd, d, err := start()
		if err != nil {
			return rr, err
		}
		rr.EmptyReadyMS = append(rr.EmptyReadyMS, float64(d.Microseconds())/1000)
		if err := terminate(cmd, time.Minute); err != nil {
			return rr, err
		}
	}
	cmd, _, err := start()
	if err != nil {
		return rr, err
	}
	s := &server{kind: "nbdsnap", cmd: cmd, dir: dir, origin: nbdURI(sock, "r"), ctl: ctl}
	if _, err := s.create(ctx, c.nbdsnap, "big", false, c.restartCluster); err != nil {
		terminate(cmd, time.Minute)
		return rr, err
	}
	// Trims copy every cluster (the old contents must be kept) and leave
	// the sparse origin sparse, so that only the store takes room.
	// Blocks of up to 256 clusters that tile the origin exactly.
	per := int64(1)
	for per < 256 && c.restartCount%(per*2) == 0 {
		per *= 2
	}
	bs := strconv.FormatInt(per*c.restartCluster, 10)
	fill := job{id: "fill", unit: "MiB/s", pass: true,
		args: []string{"--rw=trim", "--bs=" + bs, "--iodepth=8", "--size=" + strconv.FormatInt(size, 10)}}
	t0 := time.Now()
	if _, err := runFio(ctx, s.origin, fill, fioParams{}); err != nil {
		terminate(cmd, time.Minute)
		return rr, err
	}
	rr.FillSeconds = time.Since(t0).Seconds()
	for i := 0; i < 3; i++ {
		t0 := time.Now()
		if err := terminate(s.cmd, 5*time.Minute); err != nil {
			return rr, err
		}
		rr.ShutdownMS = append(rr.ShutdownMS, float64(time.Since(t0).Microseconds())/1000)
		cmd, d, err := start()
		if err != nil {
			return rr, err
		}
		s.cmd = cmd
		rr.ReadyMS = append(rr.ReadyMS, float64(d.Microseconds())/1000)
	}
	defer terminate(s.cmd, 5*time.Minute)
	rr.RSSKiB, _ = s.memKiB()
	st, err := s.status(ctx, c.nbdsnap)
	if err != nil {
		return rr, err
	}
	if len(st.Snapshots) != 1 || st.Snapshots[0].State != "valid" {
		return rr, fmt.Errorf("restart: want one valid snapshot after the restart, got %+v", st.Snapshots)
	}
	rr.ClustersCopied = st.Snapshots[0].ClustersCopied
	if rr.ClustersCopied != c.restartCount {
		return rr, fmt.Errorf("restart: %d clusters copied after the restart, want %d", rr.ClustersCopied, c.restartCount)
	}
	if fi, err := os.Stat(filepath.Join(dir, "big.cow")); err == nil {
		rr.StoreBytes = fi.Size()
	}
	c.log.Info("restart", "location", l.name, "result", rr)
	return rr, nil
}

// startNotified starts a daemon with NOTIFY_SOCKET pointing at a socket of
// ours and returns once it sent READY=1, with the time that took.
func startNotified(ctx context.Context, name string, args ...string) (*exec.Cmd, time.Duration, error) {
	nd, err := os.MkdirTemp("", "benchsnap-notify.")
	if err != nil {
		return nil, 0, fmt.Errorf("notify socket: %w", err)
	}
	defer os.RemoveAll(nd)
	path := filepath.Join(nd, "n")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, 0, fmt.Errorf("notify socket: %w", err)
	}
	defer conn.Close()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+path)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, 0, fmt.Errorf("start %s: %w", name, err)
	}
	buf := make([]byte, 4096)
	for {
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Minute))
		n, err := conn.Read(buf)
		if err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, 0, fmt.Errorf("%s: no READY=1: %w", name, err)
		}
		for _, line := range strings.Split(string(buf[:n]), "\n") {
			if line == "READY=1" {
				return cmd, time.Since(t0), nil
			}
		}
		if ctx.Err() != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, 0, ctx.Err()
		}
	}
}
