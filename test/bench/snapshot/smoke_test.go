package snapshot_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestBenchSmoke runs the snapshot scenarios of `make bench` the way
// test/bench/run.sh does (sourcing scenarios.d/snapshot.sh), with tiny
// sizes, one run and one location, and checks that every scenario produced
// its numbers, the targets and the chart: the harness cannot rot unnoticed.
func TestBenchSmoke(t *testing.T) {
	for _, tool := range []string{"fio", "nbdkit", "qemu-storage-daemon", "nbdcopy", "gnuplot", "go", "bash"} {
		testenv.RequireTool(t, tool)
	}
	root, tmp, bin := smokeSetup(t)
	out := filepath.Join(tmp, "out")
	locDir := filepath.Join(tmp, "loc")
	md := runBench(t, root, out, []string{"work=" + tmp, "RUNS=1", "RUNTIME=0", "SIZE=2M",
		"SNAP_PASS_SIZE=2M", "SNAP_LOCATIONS=tmp=" + locDir, "SNAP_RESTART_CLUSTERS=1024",
		"SNAP_CREATE_SAMPLES=3", "SNAP_OUT=" + out, "SNAP_NBDSNAP=" + bin},
		"-c", "set -euo pipefail; . test/bench/scenarios.d/snapshot.sh")
	// Which columns each kind of row must fill: nbdkit, QEMU, nbdsnap,
	// nbdsnap transient (cells 2-5 after scenario and unit).
	want := []struct {
		prefix string
		rows   int
		filled [4]bool
	}{
		{"proxy, no snapshot:", 4, [4]bool{true, true, true, false}},
		{"no snapshot:", 4, [4]bool{false, true, true, false}},
		{"first write, fresh snapshot:", 4, [4]bool{false, true, true, true}},
		{"rewrite of copied clusters:", 4, [4]bool{false, true, true, true}},
		{"snapshot export:", 1, [4]bool{false, true, true, true}},
		{"first write, 4 fresh snapshots:", 1, [4]bool{false, false, true, true}},
	}
	for _, w := range want {
		n := 0
		for _, line := range strings.Split(string(md), "\n") {
			cells := strings.Split(line, "|")
			if len(cells) != 11 || !strings.HasPrefix(strings.TrimSpace(cells[1]), w.prefix) {
				continue
			}
			n++
			for i, f := range w.filled {
				c := strings.TrimSpace(cells[3+i])
				if f == (c == "—") {
					t.Errorf("row %q, column %d: %q, want it filled=%v", strings.TrimSpace(cells[1]), i, c, f)
				}
			}
		}
		if n != w.rows {
			t.Errorf("%d rows starting %q, want %d\n%s", n, w.prefix, w.rows, md)
		}
	}
	for _, s := range []string{"## Targets", "create < 50 ms", "Create latency", "Restart with 1024 copied clusters",
		"clusters reported copied after the restart 1024", "Peak RSS", "Load average"} {
		if !bytes.Contains(md, []byte(s)) {
			t.Errorf("results.md lacks %q", s)
		}
	}
	var raw struct {
		Checks []string `json:"checks"`
	}
	b, err := os.ReadFile(filepath.Join(out, "raw.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw.Checks) != 3 {
		t.Errorf("%d snapshot-content checks passed, want 3 (QEMU, nbdsnap, nbdsnap transient): %q", len(raw.Checks), raw.Checks)
	}
	png, err := os.ReadFile(filepath.Join(out, "chart.png"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG")) || len(png) < 10000 {
		t.Errorf("chart.png: %d bytes, not a plausible PNG chart", len(png))
	}
}

// TestHeldWritesBenchSmoke runs the held-writes rows of `make bench`
// (test/bench/scenario.sh heldwrites) with tiny sizes, one run and one
// location, and checks that every row has its two numbers.
func TestHeldWritesBenchSmoke(t *testing.T) {
	for _, tool := range []string{"fio", "nbdkit", "qemu-storage-daemon", "nbdcopy", "jq", "bc", "go", "bash"} {
		testenv.RequireTool(t, tool)
	}
	root, tmp, bin := smokeSetup(t)
	loc := filepath.Join(tmp, "loc")
	out := filepath.Join(tmp, "out")
	md := runBench(t, root, out, []string{"RUNS=1", "NBDSNAP=" + bin, "OUT=" + out,
		"HELD_LOCATIONS=tmp=" + loc, "HELD_SIZE=32M", "HELD_PASS=16M", "HELD_BENCHTIME=64x"},
		"test/bench/scenario.sh", "heldwrites")
	if _, err := os.Stat(filepath.Join(out, "samples.tsv")); err != nil {
		t.Errorf("no samples kept: %v", err)
	}
	rows := 0
	for _, line := range strings.Split(string(md), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) != 8 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "held writes, ") {
			continue
		}
		rows++
		for _, c := range cells[2:4] {
			if v, err := strconv.ParseFloat(strings.TrimSpace(c), 64); err != nil || v <= 0 {
				t.Errorf("row %q: %q is not a measurement", strings.TrimSpace(cells[1]), c)
			}
		}
	}
	// Per location 8 rows and 2 ceilings, and 8 rows of the engine (2 ms
	// sync and /var/tmp).
	if rows != 18 {
		t.Errorf("%d held-writes rows, want 18:\n%s", rows, md)
	}
}

// smokeSetup returns the repository's root, a temporary directory with an
// empty "loc" directory for the benchmark's files, and an nbdsnap built
// from the tree in it.
func smokeSetup(t *testing.T) (root, tmp, bin string) {
	t.Helper()
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	tmp = t.TempDir()
	bin = filepath.Join(tmp, "nbdsnap")
	build := exec.Command("go", "build", "-o", bin, "./cmd/nbdsnap")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build nbdsnap: %v\n%s", err, out)
	}
	if err := os.Mkdir(filepath.Join(tmp, "loc"), 0o755); err != nil {
		t.Fatal(err)
	}
	return root, tmp, bin
}

// runBench runs bash with args in root, env added to the environment,
// fails the test with the benchmark's stderr if it fails, and returns the
// results.md it wrote into out.
func runBench(t *testing.T, root, out string, env []string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("bash", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	t0 := time.Now()
	if _, err := cmd.Output(); err != nil {
		t.Fatalf("benchmark: %v\n%s", err, stderr.String())
	}
	t.Logf("smoke run took %v", time.Since(t0))
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	return md
}
