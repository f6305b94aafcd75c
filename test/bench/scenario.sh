#!/usr/bin/env bash
# Runs one scenario of `make bench` alone: test/bench/scenarios.d/NAME.sh,
# which run.sh sources after its built-in ones. Prints its table; not part
# of `make test`.
#
#   test/bench/scenario.sh rollback
#   OUT=bench/results/$(date -u +%Y-%m-%dT%H%MZ)-held-writes test/bench/scenario.sh heldwrites
#
# Scenarios: backup (an incremental backup through qemu:dirty-bitmap vs a
# full nbdcopy), rollback (nbdsnap rollback --wait vs nbdcopy of the
# snapshot onto the origin), heldwrites (persistent first writes held, not
# held and transient), snapshot (nbdsnap vs nbdkit vs QEMU fleecing; its
# own results directory: SNAP_OUT). Each says what it measures and the
# variables it takes at its top.
#
# Environment: RUNS (default 3), SIZE of the origins (default 1G), DIR for
# the scratch directory (default /dev/shm), OUT a directory for
# results.md, samples.tsv (the scenario's samples) and the load before and
# after; NBDSNAP the binary (default bin/nbdsnap).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 1 ] && [ -e "test/bench/scenarios.d/$1.sh" ] || {
	echo "usage: $0 NAME (one of: $(cd test/bench/scenarios.d && ls *.sh | sed 's/\.sh$//' | tr '\n' ' '))" >&2
	exit 2
}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
OUT=${OUT:-}
NBDSNAP=${NBDSNAP:-bin/nbdsnap}
# shellcheck source=lib.sh
. test/bench/lib.sh
[ -z "$OUT" ] || { mkdir -p "$OUT"; uptime >"$OUT/uptime-before.txt"; }
# scenario_note: what the scenario's ours and ref are, for the table's head.
scenario_note=""
# shellcheck source=/dev/null
. "test/bench/scenarios.d/$1.sh"

table() {
	echo "nbdsnap bench, scenarios.d/$1.sh, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $("$NBDSNAP" version | head -1)," \
		"SIZE $SIZE, medians of $RUNS runs${scenario_note:+; $scenario_note}"
	echo
	echo "| scenario | ours | ref | unit | ours/ref | runs ours / ref |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
}
if [ -n "$OUT" ]; then
	uptime >"$OUT/uptime-after.txt"
	for f in "$work"/*-samples.tsv; do
		[ -e "$f" ] && cp "$f" "$OUT/samples.tsv"
	done
	table "$1" | tee "$OUT/results.md"
else
	table "$1"
fi
