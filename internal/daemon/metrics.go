package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// metrics is the daemon's Prometheus side: a registry of its own (never the
// process-wide default, so that two daemons in one test process do not
// collide), the request counters fed by nbdsrv's Observe hook, and a
// collector that reads the engine's counters at scrape time, so that the
// engine keeps the only copy of them.
type metrics struct {
	reg       *prometheus.Registry
	requests  *prometheus.CounterVec
	bytes     *prometheus.CounterVec
	errors    *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	collector *collector
}

func newMetrics(d *Daemon) *metrics {
	labels := []string{"export", "cmd"}
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nbdsnap_export_requests_total", Help: "NBD requests answered, by export and command.",
		}, labels),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nbdsnap_export_bytes_total", Help: "Payload bytes of NBD READ and WRITE requests answered, by export and command.",
		}, labels),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nbdsnap_export_errors_total", Help: "NBD requests answered with an error, by export and command.",
		}, labels),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "nbdsnap_export_request_duration_seconds",
			Help:    "Time the backend took for an NBD request (for a READ over 1 MiB, its first MiB), by export and command.",
			Buckets: []float64{10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1},
		}, labels),
		collector: &collector{d: d},
	}
	m.reg.MustRegister(m.requests, m.bytes, m.errors, m.latency, m.collector)
	return m
}

// observe is nbdsrv.Config.Observe.
func (m *metrics) observe(export string, cmd nbdsrv.Cmd, n int, d time.Duration, errno nbdsrv.Errno) {
	c := cmdLabel(cmd)
	m.requests.WithLabelValues(export, c).Inc()
	if errno != 0 {
		m.errors.WithLabelValues(export, c).Inc()
		return
	}
	if n > 0 {
		m.bytes.WithLabelValues(export, c).Add(float64(n))
	}
	if d > 0 { // refusals are not timed
		m.latency.WithLabelValues(export, c).Observe(d.Seconds())
	}
}

// forget drops a removed export's series, so that a cleared snapshot does
// not linger in every scrape.
func (m *metrics) forget(export string) {
	l := prometheus.Labels{"export": export}
	m.requests.DeletePartialMatch(l)
	m.bytes.DeletePartialMatch(l)
	m.errors.DeletePartialMatch(l)
	m.latency.DeletePartialMatch(l)
}

// cmdLabel names a command in lower case, as label values usually are.
func cmdLabel(c nbdsrv.Cmd) string {
	switch c {
	case nbdsrv.CmdRead:
		return "read"
	case nbdsrv.CmdWrite:
		return "write"
	case nbdsrv.CmdFlush:
		return "flush"
	case nbdsrv.CmdTrim:
		return "trim"
	case nbdsrv.CmdCache:
		return "cache"
	case nbdsrv.CmdWriteZeroes:
		return "write_zeroes"
	case nbdsrv.CmdBlockStatus:
		return "block_status"
	}
	return "other"
}

// serveMetrics serves /metrics on l until the server is closed.
func (d *Daemon) serveMetrics(l net.Listener) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{
		ErrorLog: errorLogger{d}, ErrorHandling: promhttp.ContinueOnError,
	}))
	d.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := d.metricsSrv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.fail(fmt.Errorf("metrics listener %s: %w", l.Addr(), err))
		}
	}()
}

// errorLogger is promhttp's error log.
type errorLogger struct{ d *Daemon }

func (l errorLogger) Println(v ...any) { l.d.log.Warn("metrics: " + fmt.Sprint(v...)) }

// collector reports the origin and the snapshots from the engine's Info at
// scrape time.
type collector struct{ d *Daemon }

var (
	snapLabels = []string{"origin", "snapshot"}

	descOriginSize  = prometheus.NewDesc("nbdsnap_origin_size_bytes", "Size of the origin.", []string{"origin"}, nil)
	descConns       = prometheus.NewDesc("nbdsnap_export_connections", "NBD connections in transmission on the export.", []string{"export"}, nil)
	descSnapshots   = prometheus.NewDesc("nbdsnap_snapshots", "Snapshots the daemon knows of, valid or not.", []string{"origin"}, nil)
	descValid       = prometheus.NewDesc("nbdsnap_snapshot_valid", "1 while the snapshot is valid, 0 once it is invalid.", snapLabels, nil)
	descClusters    = prometheus.NewDesc("nbdsnap_snapshot_clusters", "Clusters the snapshot covers.", snapLabels, nil)
	descCopied      = prometheus.NewDesc("nbdsnap_snapshot_clusters_copied", "Clusters of the origin copied for the snapshot so far.", snapLabels, nil)
	descBytesCopied = prometheus.NewDesc("nbdsnap_snapshot_copied_bytes_total", "Origin bytes copied for the snapshot.", snapLabels, nil)
	descStoreBytes  = prometheus.NewDesc("nbdsnap_snapshot_store_bytes", "Size of the snapshot's backing store.", snapLabels, nil)
	descStoreMax    = prometheus.NewDesc("nbdsnap_snapshot_store_max_bytes", "The snapshot's --max-size (only when set).", snapLabels, nil)
	descStoreFree   = prometheus.NewDesc("nbdsnap_snapshot_store_free_bytes", "Bytes the store may still grow: the smaller of what --max-size leaves and its file system's free space.", snapLabels, nil)
	descFSFree      = prometheus.NewDesc("nbdsnap_snapshot_store_fs_free_bytes", "Free space of the file system holding the store (file stores only).", snapLabels, nil)
	descFSSize      = prometheus.NewDesc("nbdsnap_snapshot_store_fs_size_bytes", "Size of the file system holding the store (file stores only).", snapLabels, nil)
	descSpaceLevel  = prometheus.NewDesc("nbdsnap_snapshot_store_space_level", "0: room; 1: the store passed 80% of --max-size; 2: it passed 95%, or its file system is under its reserve.", snapLabels, nil)
	descCowCalls    = prometheus.NewDesc("nbdsnap_snapshot_cow_calls_total", "Origin-modifying requests that consulted the snapshot.", snapLabels, nil)
	descCacheWaits  = prometheus.NewDesc("nbdsnap_snapshot_cache_full_waits_total", "Times an origin write waited for a free cache slot.", snapLabels, nil)
	descBatches     = prometheus.NewDesc("nbdsnap_snapshot_commit_batches_total", "Commits of copied clusters to the store.", snapLabels, nil)
	descSyncs       = prometheus.NewDesc("nbdsnap_snapshot_commit_syncs_total", "Commits that synced the store (persistent snapshots).", snapLabels, nil)
	descCommitTime  = prometheus.NewDesc("nbdsnap_snapshot_commit_duration_seconds", "Time a commit took, writes and sync together.", snapLabels, nil)
	descRollback    = prometheus.NewDesc("nbdsnap_rollback_remaining_bytes", "Bytes a rollback under way has still to copy back (only during one).", []string{"origin", "snapshot", "state"}, nil)
	descRollbackAll = prometheus.NewDesc("nbdsnap_rollback_total_bytes", "Bytes a rollback under way copies back in all (only during one).", []string{"origin", "snapshot"}, nil)
	descHeld        = prometheus.NewDesc("nbdsnap_held_writes", "Origin writes answered before their snapshots' commit and not yet on the origin.", []string{"origin"}, nil)
	descHeldBytes   = prometheus.NewDesc("nbdsnap_held_writes_bytes", "What the held writes cost now (payload and 8 KiB each).", []string{"origin"}, nil)
	descHeldBudget  = prometheus.NewDesc("nbdsnap_held_writes_budget_bytes", "The most held writes may cost (--held-size); 0: writes are never held.", []string{"origin"}, nil)
	descHeldTotal   = prometheus.NewDesc("nbdsnap_held_writes_total", "Origin writes held since the daemon started.", []string{"origin"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descOriginSize, descConns, descSnapshots, descValid, descClusters, descCopied,
		descBytesCopied, descStoreBytes, descStoreMax, descStoreFree, descFSFree, descFSSize, descSpaceLevel,
		descCowCalls, descCacheWaits, descBatches, descSyncs, descCommitTime, descRollback, descRollbackAll,
		descHeld, descHeldBytes, descHeldBudget, descHeldTotal} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	origin := d.cfg.Name
	gauge := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, labels...)
	}
	counter := func(desc *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(descOriginSize, float64(d.engine.Size()), origin)
	gauge(descConns, float64(d.srv.OpenConns(origin)), origin)
	held := d.engine.Held()
	gauge(descHeld, float64(held.Writes), origin)
	gauge(descHeldBytes, float64(held.Bytes), origin)
	gauge(descHeldBudget, float64(held.Budget), origin)
	counter(descHeldTotal, held.Total, origin)
	if ri, ok := d.engine.RollbackInfo(); ok {
		st := toStatus(ri)
		gauge(descRollback, float64(st.RemainingBytes), origin, st.Snapshot, st.State)
		gauge(descRollbackAll, float64(st.TotalBytes), origin, st.Snapshot)
	}

	d.mu.Lock()
	entries := make([]entry, 0, len(d.snaps))
	for _, e := range d.snaps {
		entries = append(entries, *e)
	}
	d.mu.Unlock()
	gauge(descSnapshots, float64(len(entries)), origin)
	now := time.Now()
	for _, e := range entries {
		name := e.rec.Name
		if e.served {
			gauge(descConns, float64(d.srv.OpenConns(name)), name)
		}
		if e.snap == nil {
			gauge(descValid, 0, origin, name)
			continue
		}
		i := e.snap.Info()
		valid := 0.0
		if i.Valid {
			valid = 1
		}
		gauge(descValid, valid, origin, name)
		gauge(descClusters, float64(i.ClustersTotal), origin, name)
		gauge(descCopied, float64(i.ClustersCopied), origin, name)
		counter(descBytesCopied, i.Stats.BytesCopied, origin, name)
		counter(descCowCalls, i.Stats.CowCalls, origin, name)
		counter(descCacheWaits, i.Stats.CacheFullWaits, origin, name)
		counter(descBatches, i.Stats.Batches, origin, name)
		counter(descSyncs, i.Stats.Syncs, origin, name)
		h := i.Stats.CommitLatency
		buckets := make(map[float64]uint64, len(h.Bounds))
		var cum uint64
		for k, b := range h.Bounds {
			cum += uint64(h.Counts[k])
			buckets[b.Seconds()] = cum
		}
		cum += uint64(h.Counts[len(h.Bounds)])
		ch <- prometheus.MustNewConstHistogram(descCommitTime, cum, h.Sum.Seconds(), buckets, origin, name)

		sp := d.checkSpace(e.rec, e.snap, now)
		gauge(descStoreBytes, float64(sp.storeBytes), origin, name)
		if sp.maxSize > 0 {
			gauge(descStoreMax, float64(sp.maxSize), origin, name)
		}
		if sp.free >= 0 {
			gauge(descStoreFree, float64(sp.free), origin, name)
		}
		if sp.fsFree >= 0 {
			gauge(descFSFree, float64(sp.fsFree), origin, name)
			gauge(descFSSize, float64(sp.fsSize), origin, name)
		}
		gauge(descSpaceLevel, float64(sp.level), origin, name)
	}
}
