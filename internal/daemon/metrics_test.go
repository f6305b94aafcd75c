package daemon

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

func TestParseMetricsListen(t *testing.T) {
	for in, want := range map[string]string{
		":9100":            "127.0.0.1:9100",
		"0.0.0.0:9100":     "0.0.0.0:9100",
		"tcp::9100":        "127.0.0.1:9100",
		"[::1]:0":          "[::1]:0",
		"unix:/x.sock":     "",
		"localhost":        "",
		"tcp:0.0.0.0:9100": "0.0.0.0:9100",
	} {
		a, err := parseMetricsListen(in)
		if (err == nil) != (want != "") || err == nil && a.addr != want {
			t.Errorf("parseMetricsListen(%q) = %v, %v; want %q", in, a, err, want)
		}
	}
}

// TestMetricsScrape scrapes a running daemon that has a snapshot and
// answered NBD requests: the families are there, and promtool finds the
// exposition and the example alert rules clean.
func TestMetricsScrape(t *testing.T) {
	promtool := testenv.RequireTool(t, "promtool")
	e := newEnv(t, 4<<20)
	cfg := e.config()
	cfg.MetricsListen = "127.0.0.1:0"
	d := start(t, cfg)
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow"), MaxSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	nc := nbdConnect(t, e.sock, "unix", "data")
	defer nc.Close()
	nbdWrite(t, nc, 1, 0, make([]byte, 4096))
	if _, errno, err := nbdReply(nc); err != nil || errno != 0 {
		t.Fatalf("nbd write: errno %d, %v", errno, err)
	}

	resp, err := http.Get("http://" + d.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s, %v", resp.Status, err)
	}
	for _, want := range []string{
		`nbdsnap_export_requests_total{cmd="write",export="data"} 1`,
		`nbdsnap_export_bytes_total{cmd="write",export="data"} 4096`,
		`nbdsnap_export_request_duration_seconds_count{cmd="write",export="data"} 1`,
		`nbdsnap_export_connections{export="data"} 1`,
		`nbdsnap_origin_size_bytes{origin="data"} 4.194304e+06`,
		`nbdsnap_snapshot_valid{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_clusters_copied{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_copied_bytes_total{origin="data",snapshot="s"} 65536`,
		`nbdsnap_snapshot_cow_calls_total{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_commit_batches_total{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_commit_syncs_total{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_commit_duration_seconds_count{origin="data",snapshot="s"} 1`,
		`nbdsnap_snapshot_store_max_bytes{origin="data",snapshot="s"} 1.048576e+06`,
		`nbdsnap_snapshot_store_space_level{origin="data",snapshot="s"} 0`,
		`nbdsnap_snapshot_store_fs_free_bytes{origin="data",snapshot="s"}`,
		`nbdsnap_snapshot_cache_full_waits_total{origin="data",snapshot="s"} 0`,
	} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}

	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = bytes.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	rules := filepath.Join("..", "..", "contrib", "prometheus", "nbdsnap-alerts.yml")
	if out, err := exec.Command(promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", rules, err, out)
	}

	// A cleared snapshot leaves no series behind.
	if _, err := c.Clear(ctx, "s", false); err != nil {
		t.Fatal(err)
	}
	resp, err = http.Get("http://" + d.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if bytes.Contains(body, []byte(`snapshot="s"`)) {
		t.Errorf("cleared snapshot still scraped:\n%s", body)
	}
}

// TestStoreSpaceWarning fills a snapshot's store past 80% of its
// --max-size: the warning is logged once however often the watch looks,
// and status shows the space left.
func TestStoreSpaceWarning(t *testing.T) {
	e := newEnv(t, 4<<20)
	logs := &testenv.SyncBuffer{}
	cfg := e.config()
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	cfg.SpaceInterval = 10 * time.Millisecond
	d := start(t, cfg)
	ctx := context.Background()
	c := control.NewClient(e.ctl)
	const cs = 64 << 10
	const maxSize = 10 * cs
	if _, err := c.Create(ctx, control.CreateRequest{Name: "s", BackingPath: filepath.Join(e.dir, "s.cow"), ClusterSize: cs, MaxSize: maxSize}); err != nil {
		t.Fatal(err)
	}
	const msg = `level=WARN msg="snapshot store passed 80% of its max size" snapshot=s`
	var info control.SnapshotInfo
	for i := 0; ; i++ {
		var err error
		if info, err = c.Snapshot(ctx, "s"); err != nil {
			t.Fatal(err)
		}
		if info.BackingBytes*100 >= 80*maxSize {
			break
		}
		if strings.Contains(logs.String(), "snapshot store passed") {
			t.Fatalf("warned at %d of %d bytes:\n%s", info.BackingBytes, maxSize, logs)
		}
		// Flushed, so that the commit, and the store's growth, happen
		// now rather than when a held write's commit is due.
		if err := d.engine.WriteAt(ctx, make([]byte, cs), int64(i)*cs, false); err != nil {
			t.Fatalf("origin write %d: %v", i, err)
		}
		if err := d.engine.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if info.BackingBytes*100 >= 95*maxSize || info.State != control.StateValid {
		t.Fatalf("store at %d of %d bytes, %s: the test wants it between 80%% and 95%%", info.BackingBytes, maxSize, info.State)
	}
	// Many watch rounds, a status and a scrape's worth of checks later,
	// still one warning.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), msg) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := c.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), msg); n != 1 {
		t.Fatalf("warning logged %d times, want once:\n%s", n, logs)
	}
	if strings.Contains(logs.String(), "95%") {
		t.Errorf("95%% warning before 95%%:\n%s", logs)
	}

	info, err := c.Snapshot(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if want := maxSize - info.BackingBytes; info.StoreFree != want {
		t.Errorf("store_free %d, want %d (max size %d - store %d)", info.StoreFree, want, maxSize, info.BackingBytes)
	}
	if info.FSFree <= 0 {
		t.Errorf("fs_free %d, want the file system's free space", info.FSFree)
	}
}
