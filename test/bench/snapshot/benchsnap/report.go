package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// describeMachine records what the numbers depend on.
func describeMachine(c *config) map[string]string {
	m := map[string]string{
		"date":      time.Now().UTC().Format(time.RFC3339),
		"nproc":     fmt.Sprint(runtime.NumCPU()),
		"load":      loadAvg(),
		"go":        runtime.Version(),
		"cpu":       firstMatch("/proc/cpuinfo", "model name"),
		"memory":    firstMatch("/proc/meminfo", "MemTotal"),
		"kernel":    cmdLine("uname", "-srm"),
		"fio":       cmdLine("fio", "--version"),
		"nbdkit":    cmdLine("nbdkit", "--version"),
		"qemu":      cmdLine("qemu-storage-daemon", "--version"),
		"nbdsnap":   cmdLine("git", "describe", "--always", "--dirty"),
		"os":        strings.Trim(strings.TrimPrefix(firstMatch("/etc/os-release", "PRETTY_NAME"), "PRETTY_NAME="), `"`),
		"nbdsnapv":  cmdLine(c.nbdsnap, "version"),
		"locations": "",
	}
	var locs []string
	for _, l := range c.locs {
		locs = append(locs, fmt.Sprintf("%s=%s (%s)", l.name, l.base, cmdLine("sh", "-c", "df -hT "+l.base+" | tail -1 | awk '{print $2\", \"$3\" size, \"$5\" free\"}'")))
	}
	m["locations"] = strings.Join(locs, "; ")
	return m
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func firstMatch(path, prefix string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, prefix) {
			if _, v, ok := strings.Cut(line, ":"); ok {
				return strings.Join(strings.Fields(v), " ")
			}
			return line
		}
	}
	return "unknown"
}

func cmdLine(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

// stat is the median and range of a set of samples.
type stat struct {
	med, lo, hi float64
	n           int
}

func summarize(v []float64) stat {
	if len(v) == 0 {
		return stat{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{med: med, lo: s[0], hi: s[len(s)-1], n: len(s)}
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func (s stat) String() string {
	if s.n == 0 {
		return "—"
	}
	if s.n == 1 {
		return num(s.med)
	}
	return fmt.Sprintf("%s (%s–%s)", num(s.med), num(s.lo), num(s.hi))
}

// row is one line of the table: a scenario id in the samples.
type row struct {
	id, title, unit, short string
}

func tableRows(c *config) []row {
	var rows []row
	for _, j := range proxyJobs {
		rows = append(rows, row{j.id, j.title, j.unit, "proxy " + strings.TrimPrefix(j.title, "proxy, no snapshot: ")})
	}
	for _, j := range passJobs(c) {
		rows = append(rows, row{j.id + "/nosnap", "no snapshot: " + j.title, j.unit, ""})
	}
	for _, j := range passJobs(c) {
		rows = append(rows, row{j.id + "/first", "first write, fresh snapshot: " + j.title, j.unit, "first " + strings.Split(j.title, ",")[0]})
	}
	for _, j := range passJobs(c) {
		rows = append(rows, row{j.id + "/rewrite", "rewrite of copied clusters: " + j.title, j.unit, "rewrite " + strings.Split(j.title, ",")[0]})
	}
	r := snapReadJob(c)
	rows = append(rows, row{r.id, r.title, r.unit, "snapshot 1M read QD8"})
	rows = append(rows, row{"64k-qd32/first/4snap", "first write, 4 fresh snapshots: 64K randwrite QD32, random map", "MiB/s", "first 64K QD32, 4 snaps"})
	return rows
}

var columns = []struct{ col, head string }{
	{colKit, "nbdkit"}, {colQemu, "QEMU"}, {colSnap, "nbdsnap"}, {colTr, "nbdsnap transient"},
}

func (r *results) stat(loc, id, col string) stat {
	return summarize(r.Samples[loc][id][col])
}

func ratio(a, b stat) string {
	if a.n == 0 || b.n == 0 || b.med == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2fx", a.med/b.med)
}

func writeReport(c *config, res *results) error {
	if err := os.MkdirAll(c.out, 0o755); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	raw, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(c.out, "raw.json"), raw, 0o644); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	var b strings.Builder
	m := res.Machine
	fmt.Fprintf(&b, "# nbdsnap vs nbdkit vs QEMU image fleecing — %s\n\n", m["date"])
	fmt.Fprintf(&b, "Machine: %s CPUs (%s), %s RAM, %s, kernel %s. Load average (1/5/15 min) at the start %s, at the end %s.\n\n",
		m["nproc"], m["cpu"], m["memory"], m["os"], m["kernel"], m["load"], m["load_end"])
	if len(res.LoadSamples) > 0 {
		var ones []string
		for _, l := range res.LoadSamples {
			ones = append(ones, strings.Fields(l)[0])
		}
		fmt.Fprintf(&b, "1-minute load average every 30 s during the run: %s.\n\n", strings.Join(ones, " "))
	}
	fmt.Fprintf(&b, "Versions: %s; %s; %s; %s; nbdsnap %s (%s).\n\n", m["fio"], m["nbdkit"], m["qemu"], m["go"], m["nbdsnap"], m["nbdsnapv"])
	fmt.Fprintf(&b, "Locations: %s.\n\n", m["locations"])
	fmt.Fprintf(&b, "Settings: origin %d MiB of random data, %s runs; timed jobs %s; first-write passes cover %d MiB (%d clusters of %d KiB, each written once, capped at %d s); nbdsnap and QEMU copy 64 KiB clusters. "+
		"Client: fio --ioengine=nbd, one connection, unix socket. Cells: median (min–max) over the runs. "+
		"QEMU: qemu-storage-daemon, origin exported through copy-before-write (on-cbw-error=break-snapshot), snapshot through snapshot-access, graph on the command line (taken at start); its COW target is never synced, like nbdsnap transient. "+
		"nbdsnap: `serve` with a state dir, snapshots taken with `nbdsnap create` (persistent unless said transient).\n\n",
		c.fio.size>>20, res.Config["runs"], timedDesc(c), c.passSize>>20, c.passSize/c.clusterSize, c.clusterSize>>10, c.fio.cap)
	rows := tableRows(c)
	for _, l := range c.locs {
		fmt.Fprintf(&b, "## %s (%s)\n\n", l.name, l.base)
		b.WriteString("| scenario | unit | nbdkit | QEMU | nbdsnap | nbdsnap transient | nbdsnap/nbdkit | nbdsnap/QEMU | transient/QEMU |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
		for _, r := range rows {
			fmt.Fprintf(&b, "| %s | %s |", r.title, r.unit)
			for _, col := range columns {
				fmt.Fprintf(&b, " %s |", res.stat(l.name, r.id, col.col))
			}
			kit, q := res.stat(l.name, r.id, colKit), res.stat(l.name, r.id, colQemu)
			sn, tr := res.stat(l.name, r.id, colSnap), res.stat(l.name, r.id, colTr)
			fmt.Fprintf(&b, " %s | %s | %s |\n", ratio(sn, kit), ratio(sn, q), ratio(tr, q))
		}
		b.WriteString("\nCost of the snapshot (time of the pass under a fresh snapshot / without one, same server; rewrite = throughput of the second pass / without a snapshot):\n\n")
		b.WriteString("| workload | QEMU first/none (time) | nbdsnap first/none (time) | transient first/none (time) | QEMU rewrite/none | nbdsnap rewrite/none | transient rewrite/none |\n|---|---|---|---|---|---|---|\n")
		for _, j := range passJobs(c) {
			qn, sn := res.stat(l.name, j.id+"/nosnap", colQemu), res.stat(l.name, j.id+"/nosnap", colSnap)
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n", j.title,
				ratio(qn, res.stat(l.name, j.id+"/first", colQemu)),
				ratio(sn, res.stat(l.name, j.id+"/first", colSnap)),
				ratio(sn, res.stat(l.name, j.id+"/first", colTr)),
				ratio(res.stat(l.name, j.id+"/rewrite", colQemu), qn),
				ratio(res.stat(l.name, j.id+"/rewrite", colSnap), sn),
				ratio(res.stat(l.name, j.id+"/rewrite", colTr), sn))
		}
		b.WriteString("\n")
		if cr, ok := res.Create[l.name]; ok {
			w, p := summarize(cr.WallMS), summarize(cr.PauseUS)
			fmt.Fprintf(&b, "Create latency (median of %d persistent creates after an 8 MiB write burst, `nbdsnap create` wall time incl. process start): %s ms; origin writes held (create_pause_us): %s µs.\n\n", w.n, w, p)
		}
		if mem, ok := res.MemKiB[l.name]; ok {
			fmt.Fprintf(&b, "Peak RSS (VmHWM, largest over the runs) after the proxy jobs: nbdkit %d MiB, QEMU %d MiB, nbdsnap %d MiB; after the 64K QD32 first writes, rewrites and snapshot read: QEMU %d MiB, nbdsnap %d MiB, nbdsnap transient %d MiB.\n\n",
				mem["proxy-"+colKit]>>10, mem["proxy-"+colQemu]>>10, mem["proxy-"+colSnap]>>10, mem[colQemu]>>10, mem[colSnap]>>10, mem[colTr]>>10)
		}
		if rr, ok := res.Restart[l.name]; ok {
			fmt.Fprintf(&b, "Restart with %d copied clusters of %d KiB (persistent, store %d MiB, filled in %.1f s): SIGTERM to exit %s ms; start to READY=1 %s ms (without a snapshot %s ms); RSS after the restart %d MiB; clusters reported copied after the restart %d.\n\n",
				rr.Clusters, rr.ClusterSize>>10, rr.StoreBytes>>20, rr.FillSeconds, summarize(rr.ShutdownMS), summarize(rr.ReadyMS), summarize(rr.EmptyReadyMS), rr.RSSKiB>>10, rr.ClustersCopied)
		}
	}
	b.WriteString(targets(c, res))
	b.WriteString("## Checks\n\n")
	for _, ch := range res.Checks {
		fmt.Fprintf(&b, "- %s\n", ch)
	}
	b.WriteString("\nChart: chart.png (throughput relative to the fastest server of each scenario). Raw samples: raw.json.\n")
	if err := os.WriteFile(filepath.Join(c.out, "results.md"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	os.Stdout.WriteString(b.String())
	return chart(c, res, rows)
}

func timedDesc(c *config) string {
	if c.fio.runtime == 0 {
		return "one pass over the origin (smoke settings)"
	}
	return fmt.Sprintf("%d s after 1 s ramp", c.fio.runtime)
}

// targets checks the bench's targets (in bench/results/README.md) against
// the tmpfs location (the first).
func targets(c *config, res *results) string {
	l := c.locs[0].name
	var b strings.Builder
	fmt.Fprintf(&b, "## Targets (%s)\n\n| target | measured | met |\n|---|---|---|\n", l)
	line := func(name string, v float64, ok bool, unit string) {
		if math.IsNaN(v) {
			fmt.Fprintf(&b, "| %s | — | — |\n", name)
			return
		}
		met := "no"
		if ok {
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %.2f%s | %s |\n", name, v, unit, met)
	}
	rat := func(a, b stat) float64 {
		if a.n == 0 || b.n == 0 || b.med == 0 {
			return math.NaN()
		}
		return a.med / b.med
	}
	for _, j := range proxyJobs {
		v := rat(res.stat(l, j.id, colSnap), res.stat(l, j.id, colKit))
		line("proxy ≥ 1.0x nbdkit: "+strings.TrimPrefix(j.title, "proxy, no snapshot: "), v, v >= 1.0, "x")
	}
	v := rat(res.stat(l, "64k-qd32/nosnap", colSnap), res.stat(l, "64k-qd32/first", colSnap))
	line("first write 64K QD32 ≤ 1.4x the no-snapshot time (persistent)", v, v <= 1.4, "x")
	v = rat(res.stat(l, "64k-qd32/first", colSnap), res.stat(l, "64k-qd32/first", colQemu))
	line("first write 64K QD32 ≥ 1.3x QEMU's throughput (persistent)", v, v >= 1.3, "x")
	v = rat(res.stat(l, "64k-qd32/first", colTr), res.stat(l, "64k-qd32/first", colQemu))
	line("(same, transient)", v, v >= 1.3, "x")
	for _, id := range []string{"64k-qd32", "4k-qd32"} {
		v = rat(res.stat(l, id+"/rewrite", colSnap), res.stat(l, id+"/nosnap", colSnap))
		line("rewrite ≥ 0.95x no-snapshot ("+id+", persistent)", v, v >= 0.95, "x")
	}
	v = rat(res.stat(l, "snap-read", colSnap), res.stat(l, "snap-read", colQemu))
	line("snapshot read ≥ 1.0x QEMU snapshot-access (persistent)", v, v >= 1.0, "x")
	if cr, ok := res.Create[l]; ok {
		w := summarize(cr.WallMS)
		line("create < 50 ms (median, CLI wall time)", w.med, w.med < 50, " ms")
	}
	b.WriteString("\n")
	return b.String()
}

// chart plots, per location, each server's median relative to the fastest
// server of the scenario, with gnuplot.
func chart(c *config, res *results, rows []row) error {
	var gp strings.Builder
	n := len(c.locs)
	fmt.Fprintf(&gp, "set terminal pngcairo size 1600,%d font 'Sans,10'\nset output '%s'\n", 520*n, filepath.Join(c.out, "chart.png"))
	fmt.Fprintf(&gp, "set multiplot layout %d,1\nset style data histograms\nset style histogram clustered gap 1\nset style fill solid 0.9 border -1\n", n)
	gp.WriteString("set datafile missing '-'\nset datafile separator '\\t'\nset yrange [0:1.1]\nset ytics 0.2\nset grid ytics\nset key top right horizontal\nset xtics rotate by -35 font 'Sans,9'\nset ylabel 'median / best server (1 = fastest)'\nset bmargin 7\n")
	for _, l := range c.locs {
		dat := filepath.Join(c.out, "chart-"+l.name+".dat")
		var d strings.Builder
		d.WriteString("scenario\tnbdkit\tQEMU\tnbdsnap\tnbdsnap transient\n")
		for _, r := range rows {
			if r.short == "" {
				continue
			}
			best := 0.0
			for _, col := range columns {
				best = max(best, res.stat(l.name, r.id, col.col).med)
			}
			d.WriteString(r.short)
			for _, col := range columns {
				s := res.stat(l.name, r.id, col.col)
				if s.n == 0 || best == 0 {
					d.WriteString("\t-")
				} else {
					fmt.Fprintf(&d, "\t%.3f", s.med/best)
				}
			}
			d.WriteString("\n")
		}
		if err := os.WriteFile(dat, []byte(d.String()), 0o644); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		fmt.Fprintf(&gp, "set title 'nbdsnap vs nbdkit vs QEMU fleecing, origin and stores in %s (%s), fio nbd, medians of %s runs'\n", l.name, l.base, res.Config["runs"])
		fmt.Fprintf(&gp, "plot '%s' using 2:xtic(1) title columnhead lc rgb '#888888', '' using 3 title columnhead lc rgb '#d95f02', '' using 4 title columnhead lc rgb '#1b9e77', '' using 5 title columnhead lc rgb '#7570b3'\n", dat)
	}
	gp.WriteString("unset multiplot\n")
	script := filepath.Join(c.out, "chart.gp")
	if err := os.WriteFile(script, []byte(gp.String()), 0o644); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	if out, err := exec.Command("gnuplot", script).CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}
