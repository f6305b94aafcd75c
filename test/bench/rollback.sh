#!/usr/bin/env bash
# The "rollback" rows of make bench (test/bench/scenarios.d/rollback.sh)
# run alone: `nbdsnap rollback s1 --wait` against an nbdcopy of s1's export
# onto the origin export, with half of a SIZE origin's 64 KiB clusters
# changed since s1, on tmpfs and on disk, medians of RUNS. Not part of
# `make test`.
#
#   test/bench/rollback.sh                 # prints the table
#   OUT=bench/results/$(date -u +%Y-%m-%dT%H%MZ)-rollback test/bench/rollback.sh
#
# Environment: RUNS (default 3), SIZE of the origin (default 1G), OUT a
# directory for results.md, samples.tsv and the load before and after; and
# the scenario's ROLLBACK_NBDSNAP (bin/nbdsnap), ROLLBACK_LOCATIONS
# (tmpfs=/dev/shm,disk=/var/tmp), ROLLBACK_CHANGED (percent of the clusters
# written, 50), ROLLBACK_SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
OUT=${OUT:-}

work=$(mktemp -d /dev/shm/nbdsnap-rollback.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rows=()
[ -z "$OUT" ] || { mkdir -p "$OUT"; uptime >"$OUT/uptime-before.txt"; }
ROLLBACK_SAMPLES=$work/samples.tsv
# shellcheck source=scenarios.d/rollback.sh
. test/bench/scenarios.d/rollback.sh

table() {
	echo "nbdsnap rollback bench, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $("$rb/nbdsnap" version | head -1)," \
		"origin $SIZE of random data, persistent snapshot s1 (64 KiB clusters), then $ROLLBACK_CHANGED% of the clusters" \
		"overwritten through the origin export; locations $ROLLBACK_LOCATIONS (origin and store on the same file system);" \
		"medians of $RUNS runs, a fresh setup each; ours = nbdsnap rollback s1 --wait, ref = nbdcopy --flush of s1's export" \
		"onto the origin export (nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}'))"
	echo
	echo "| scenario | ours | ref | unit | ours/ref | runs ours / ref |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
}
if [ -n "$OUT" ]; then
	uptime >"$OUT/uptime-after.txt"
	cp "$ROLLBACK_SAMPLES" "$OUT/samples.tsv"
	table | tee "$OUT/results.md"
else
	table
fi
