#!/usr/bin/env bash
# The copy-on-write engine's own benchmarks, apart from
# the NBD layer: BenchmarkFirstWrite writes whole clusters that no snapshot
# has copied yet, with no snapshot ("none", the baseline), a transient and a
# persistent one, origin and store in /dev/shm so that the ratio measures the
# engine and not a disk; BenchmarkCopyBound measures the CPU of the copies a
# first write cannot avoid, whose sum over the CPUs is a floor for it.
#
# Each round runs every benchmark once, ROUNDS rounds (default 5), so that
# drift on a shared machine hits all alike; cells are medians. Prints a
# markdown report and writes it to OUT (default /tmp/nbdsnap-bench-engine.md).
# Environment: ROUNDS, BENCHTIME (go test -benchtime per run, default 5000x),
# OUT. Not part of `make test`; `make bench-engine` runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-5}
BENCHTIME=${BENCHTIME:-5000x}
OUT=${OUT:-/tmp/nbdsnap-bench-engine.md}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go test -c -o "$tmp/cow.test" ./internal/cow
for r in $(seq "$ROUNDS"); do
	echo "bench-engine: round $r of $ROUNDS" >&2
	# Run from $tmp: the benchmarks make their files in /dev/shm anyway.
	(cd "$tmp" && ./cow.test -test.run '^$' -test.bench 'BenchmarkFirstWrite$|BenchmarkCopyBound$' \
		-test.benchtime="$BENCHTIME") | grep '^Benchmark' >>"$tmp/raw"
done

{
	echo "# nbdsnap copy-on-write engine, $(date -u +%Y-%m-%dT%H:%MZ)"
	echo
	echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r)," \
		"$(go version | awk '{print $3}'), nbdsnap $(git rev-parse --short HEAD 2>/dev/null || echo '?')." \
		"Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg). Medians of $ROUNDS rounds of $BENCHTIME."
	echo
	awk -v ncpu="$(nproc)" '
	function median(key,    n, i, j, t, a) {
		n = split(vals[key], a, " ")
		for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
		return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	{
		name = $1; sub(/-[0-9]+$/, "", name)
		vals[name " ns"] = vals[name " ns"] " " $3
		for (i = 4; i < NF; i++) {
			if ($(i + 1) == "cpu-ns/op") vals[name " cpu"] = vals[name " cpu"] " " $i
			if ($(i + 1) == "syncs/cluster") vals[name " syncs"] = vals[name " syncs"] " " $i
		}
		if (name ~ /^BenchmarkFirstWrite\//) { split(name, p, "/"); cfg[p[2] "/" p[3]] = 1 }
	}
	END {
		print "## First write to an uncopied cluster, /dev/shm (µs per write, ratio to no snapshot)"
		print ""
		print "| cluster size / writers | none | transient | persistent | persistent syncs/cluster |"
		print "|---|---|---|---|---|"
		for (c in cfg) order[++nc] = c
		for (i = 2; i <= nc; i++) { t = order[i]; for (j = i - 1; j >= 1 && sortkey(order[j]) > sortkey(t); j--) order[j + 1] = order[j]; order[j + 1] = t }
		for (i = 1; i <= nc; i++) {
			b = "BenchmarkFirstWrite/" order[i]
			none = median(b "/none ns") / 1000; tr = median(b "/transient ns") / 1000; pe = median(b "/persistent ns") / 1000
			printf "| %s | %.1f | %.1f (%.2fx) | %.1f (%.2fx) | %.2f |\n", order[i], none, tr, tr / none, pe, pe / none, median(b "/persistent syncs")
		}
		r = median("BenchmarkCopyBound/read cpu") / 1000; o = median("BenchmarkCopyBound/overwrite cpu") / 1000
		f = median("BenchmarkCopyBound/fresh-write cpu") / 1000; k = median("BenchmarkCopyBound/checksum cpu") / 1000
		print ""
		print "## The floor: CPU of the copies a 64 KiB first write needs (BenchmarkCopyBound, µs)"
		print ""
		printf "read old cluster %.1f · overwrite origin %.1f · write store (fresh pages) %.1f · checksum %.1f\n", r, o, f, k
		print ""
		printf "On %d CPUs a first write cannot take less than (read + overwrite + store write) / %d = %.1f µs transient,\n", ncpu, ncpu, (r + o + f) / ncpu
		printf "(… + checksum) / %d = %.1f µs persistent. As ratios to this run'"'"'s no-snapshot write at 64K\n", ncpu, (r + o + f + k) / ncpu
		print ""
		print "| writers | none | floor transient | floor persistent |"
		print "|---|---|---|---|"
		for (w = 4; w <= 16; w *= 4) { # enough writers to keep every CPU busy
			none = median("BenchmarkFirstWrite/cs=64K/writers=" w "/none ns") / 1000
			if (none > 0) printf "| %d | %.1f | %.2fx | %.2fx |\n", w, none, (r + o + f) / ncpu / none, (r + o + f + k) / ncpu / none
		}
	}
	function sortkey(c,    a, b) { split(c, a, "/"); sub(/cs=/, "", a[1]); sub(/K/, "", a[1]); sub(/writers=/, "", a[2]); return sprintf("%08d/%04d", a[1], a[2]) }
	' "$tmp/raw"
} | tee "$OUT"
echo "bench-engine: report in $OUT" >&2
