#!/usr/bin/env bash
# The "backup" rows of make bench (test/bench/scenarios.d/backup.sh) run
# alone: an incremental backup of a snapshot through the
# qemu:dirty-bitmap context against a full nbdcopy of it, medians of RUNS.
# Not part of `make test`.
#
#   test/bench/backup.sh                 # prints the table
#   OUT=bench/results/$(date -u +%Y-%m-%dT%H%MZ)-cbt test/bench/backup.sh
#
# Environment: RUNS (default 3), SIZE of the origin (default 1G), DIR for
# the origin, stores and copies (default /dev/shm), OUT a directory for
# results.md, samples.tsv and the load before and after; and the scenario's
# BACKUP_NBDSNAP (bin/nbdsnap), BACKUP_CHANGED (percent of the clusters
# written, 1), BACKUP_SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
DIR=${DIR:-/dev/shm}
OUT=${OUT:-}

work=$(mktemp -d "$DIR/nbdsnap-backup.XXXXXX")
pids=()
cleanup() {
	fusermount3 -u "$work/backup/mnt" 2>/dev/null || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rows=()
[ -z "$OUT" ] || { mkdir -p "$OUT"; uptime >"$OUT/uptime-before.txt"; }
BACKUP_SAMPLES=$work/samples.tsv
# shellcheck source=scenarios.d/backup.sh
. test/bench/scenarios.d/backup.sh

table() {
	echo "nbdsnap backup bench, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $("$bk/nbdsnap" version | head -1)," \
		"origin $SIZE of random data in $DIR, $bk_written of $(($(stat -c %s "$bk/origin.img") / 65536)) 64 KiB clusters" \
		"written (4 KiB each) between s1 and s2, medians of $RUNS runs; ours = the incremental, ref = a full nbdcopy of s2" \
		"(nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}'))"
	echo
	echo "| scenario | ours | ref | unit | ours/ref | runs ours / ref |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
}
if [ -n "$OUT" ]; then
	uptime >"$OUT/uptime-after.txt"
	cp "$BACKUP_SAMPLES" "$OUT/samples.tsv"
	table | tee "$OUT/results.md"
else
	table
fi
