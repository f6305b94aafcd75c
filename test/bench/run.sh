#!/usr/bin/env bash
# Benchmarks nbdsnap's NBD server against nbdkit with fio --ioengine=nbd, in
# one run, on the same file in /dev/shm, and prints a markdown table of
# medians with the ratio ours/reference. Not part of `make test`.
#
# Structure (for later scenarios, e.g. serving a snapshot):
#   - a *server* is a shell function that starts one in the background on a
#     unix socket it is given and echoes its pid (start_ours, start_nbdkit...);
#   - `compare LABEL OURS REF FIO-ARGS...` runs fio RUNS times against each
#     server, alternating them so that drift hits both alike, and adds a row;
#   - extra scenarios live in test/bench/scenarios.d/*.sh, sourced after the
#     built-in ones; they may define servers and call `compare`.
#
# Environment: RUNS (default 3), RUNTIME seconds per fio run (default 10),
# SIZE of the file (default 1G), OUT file for the table (default
# /tmp/nbdsnap-bench.md), SCENARIOS=builtin to skip scenarios.d.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
OUT=${OUT:-/tmp/nbdsnap-bench.md}
for tool in fio nbdkit jq go; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done

work=$(mktemp -d /dev/shm/nbdsnap-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

echo "bench: building the server" >&2
go build -o "$work/fileserver" ./test/bench/fileserver
# Random contents: a sparse or zero file would let a server answer with
# holes and measure nothing.
echo "bench: writing a $SIZE file of random data in $work" >&2
head -c "$SIZE" /dev/urandom >"$work/disk.img"
FILE=$work/disk.img

wait_socket() {
	for _ in $(seq 500); do [ -S "$1" ] && return 0; sleep 0.01; done
	echo "bench: no socket $1" >&2
	exit 1
}

# Servers: start_X SOCKET [extra args] — background, socket ready on return.
start_ours() {
	local sock=$1; shift
	"$work/fileserver" -file "$FILE" -unix "$sock" "$@" &
	pids+=($!)
	wait_socket "$sock"
}
start_nbdkit() {
	local sock=$1; shift
	nbdkit -f -U "$sock" "$@" &
	pids+=($!)
	wait_socket "$sock"
}
stop_all() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	pids=()
	rm -f "$work"/*.sock
}

# fio_metric SOCKET FIO-ARGS... prints IOPS (random) or MiB/s (sequential).
fio_metric() {
	local sock=$1; shift
	local json
	json=$(fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
		--size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
		--numjobs=1 --output-format=json "$@" | sed -n '/^{/,$p')
	jq -r '.jobs[0] | if (.read.io_bytes > 0) then .read else .write end
		| [.iops, .bw_bytes / 1048576] | @tsv' <<<"$json"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

rows=()
# compare LABEL UNIT OURS_SOCK REF_SOCK FIO-ARGS...; UNIT is iops or MiB/s.
compare() {
	local label=$1 unit=$2 ours=$3 ref=$4; shift 4
	local o=() r=() i col=1
	[ "$unit" = "MiB/s" ] && col=2
	for i in $(seq "$RUNS"); do
		o+=("$(fio_metric "$ours" "$@" | cut -f$col)")
		r+=("$(fio_metric "$ref" "$@" | cut -f$col)")
		echo "bench: $label run $i: ours ${o[-1]} ref ${r[-1]} $unit" >&2
	done
	local mo mr
	mo=$(printf '%s\n' "${o[@]}" | median)
	mr=$(printf '%s\n' "${r[@]}" | median)
	rows+=("$(printf '| %s | %.0f | %.0f | %s | %.2fx | %s / %s |' "$label" "$mo" "$mr" "$unit" \
		"$(echo "$mo / $mr" | bc -l)" "$(printf '%.0f ' "${o[@]}")" "$(printf '%.0f ' "${r[@]}")")")
}

# --- Built-in scenarios: file served as is. ---
start_ours "$work/ours.sock"
start_nbdkit "$work/kit.sock" file "$FILE"
compare "4k randread QD32" iops "$work/ours.sock" "$work/kit.sock" --rw=randread --bs=4k --iodepth=32
compare "4k randwrite QD32" iops "$work/ours.sock" "$work/kit.sock" --rw=randwrite --bs=4k --iodepth=32
compare "1M seq read QD8" MiB/s "$work/ours.sock" "$work/kit.sock" --rw=read --bs=1M --iodepth=8
compare "1M seq write QD8" MiB/s "$work/ours.sock" "$work/kit.sock" --rw=write --bs=1M --iodepth=8
stop_all

# --- 1 ms of backend latency: proves requests are served in parallel. ---
start_ours "$work/ours.sock" -latency 1ms
start_nbdkit "$work/kit.sock" --filter=delay file "$FILE" rdelay=1ms wdelay=1ms
compare "4k randread QD32, 1 ms backend latency" iops "$work/ours.sock" "$work/kit.sock" --rw=randread --bs=4k --iodepth=32
stop_all

for f in test/bench/scenarios.d/*.sh; do
	[ "${SCENARIOS:-all}" = builtin ] && break
	[ -e "$f" ] || continue
	# shellcheck source=/dev/null
	. "$f"
	stop_all
done

{
	echo "nbdsnap bench, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, file $SIZE in /dev/shm," \
		"medians of $RUNS fio runs of ${RUNTIME}s; ours = internal/nbdsrv (test/bench/fileserver), ref = nbdkit $(nbdkit --version | awk '{print $2}')"
	echo
	echo "| scenario | ours | ref | unit | ours/ref | runs ours / ref |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
} | tee "$OUT"
