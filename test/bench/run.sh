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
#     built-in ones; they may define servers and call `compare`, or add rows
#     of their own (backup.sh: an incremental backup through the
#     qemu:dirty-bitmap context vs a full nbdcopy; test/bench/scenario.sh
#     runs one alone). What they share with this script is in lib.sh.
#
# A second table, the sparse copy, times nbdcopy of a snapshot export of a
# 90%-sparse 1 GiB origin to a file, with nbdsnap's allocation map and
# without it (see sparse_copy below).
#
# Environment: RUNS (default 3), RUNTIME seconds per fio run (default 10),
# SIZE of the file (default 1G), OUT file for the table (default
# /tmp/nbdsnap-bench.md), SCENARIOS=builtin to skip scenarios.d,
# SCENARIOS=sparse for the sparse copy alone (test/bench/scenario.sh runs
# one of scenarios.d alone); NBDSNAP the binary of the
# sparse copy (default bin/nbdsnap), NBDSNAP_BEFORE an older one to compare
# it with (default: NBDSNAP with the map ignored by nbdcopy).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
OUT=${OUT:-/tmp/nbdsnap-bench.md}
SCENARIOS=${SCENARIOS:-all}
NBDSNAP=${NBDSNAP:-bin/nbdsnap}
NBDSNAP_BEFORE=${NBDSNAP_BEFORE:-}
for tool in fio nbdkit jq go nbdcopy; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
[ -x "$NBDSNAP" ] || { echo "bench: $NBDSNAP is not built (make build)" >&2; exit 1; }

# shellcheck source=lib.sh
DIR=/dev/shm . test/bench/lib.sh

if [ "$SCENARIOS" != sparse ]; then
	echo "bench: building the server" >&2
	go build -o "$work/fileserver" ./test/bench/fileserver
	# Random contents: a sparse or zero file would let a server answer
	# with holes and measure nothing.
	echo "bench: writing a $SIZE file of random data in $work" >&2
	head -c "$SIZE" /dev/urandom >"$work/disk.img"
fi
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
# With TLS set, it connects with TLS. fio's nbd engine cannot name the
# certificates (libnbd refuses tls-certificates in a URI unless the program
# allows local files, which fio does not), and libnbd's default directory
# for root is /etc/pki/libnbd, which is not ours to write; for other users
# it is $HOME/.pki/libnbd. So fio then runs as nobody, with HOME=$TLS.
TLS=""
fio_metric() {
	local sock=$1; shift
	local json uri="nbd+unix:///?socket=$sock" run=()
	if [ -n "$TLS" ]; then
		uri="nbds+unix:///?socket=$sock"
		run=(setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME="$TLS")
	fi
	json=$("${run[@]}" fio --name=bench --ioengine=nbd --uri="$uri" \
		--size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
		--numjobs=1 --output-format=json "$@" | sed -n '/^{/,$p')
	jq -r '.jobs[0] | if (.read.io_bytes > 0) then .read else .write end
		| [.iops, .bw_bytes / 1048576] | @tsv' <<<"$json"
}

declare -A med # LABEL/ours, LABEL/ref: the medians, for the TLS table
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
	med[$label/ours]=$mo med[$label/ref]=$mr
	rows+=("$(printf '| %s | %.0f | %.0f | %s | %.2fx | %s / %s |' "$label" "$mo" "$mr" "$unit" \
		"$(echo "$mo / $mr" | bc -l)" "$(printf '%.0f ' "${o[@]}")" "$(printf '%.0f ' "${r[@]}")")")
}

# --- Sparse copy: nbdcopy of a snapshot export of a 90%-sparse 1 GiB
# origin (1 MiB of random data every 10 MiB, holes elsewhere, in /dev/shm) to
# a file in /dev/shm, fresh for every run: seconds (median of RUNS), and the
# space the copy holds. Two daemons, each with its own copy of the origin
# and a snapshot "s" taken before anything else: "ours" is NBDSNAP;
# "before" is NBDSNAP_BEFORE if set (a binary built from an older tree,
# whose snapshot exports answered base:allocation with all data), else
# NBDSNAP with nbdcopy --no-extents, which makes nbdcopy treat the export
# as all data just as such a server made it. Each row runs nbdcopy with the
# given options: by default nbdcopy also finds zeros in what it read (-S
# 4096), so the copy is sparse either way and the map saves the reading;
# with -S 0 holes come only from the map. ---
sparse_rows=()
# start_snapd DIR BINARY: serve DIR/origin.img with BINARY, snapshot "s".
start_snapd() {
	local d=$1 bin=$2
	"$bin" serve "$d/origin.img" --name sparse --listen "unix:$d/sock" --control "$d/ctl" \
		--state-dir "$d/state" --log-level error &
	pids+=($!)
	wait_socket "$d/ctl"
	"$bin" create s --control "$d/ctl" --backing "$d/s.cow" >/dev/null
}
# sparse_copy LABEL NBDCOPY-ARGS...: one row, ours and before alternating.
sparse_copy() {
	local label=$1; shift
	local o=() b=() oa=() ba=() i side d t0 t alloc extra
	for i in $(seq "$RUNS"); do
		for side in ours before; do
			d=$work/sparse-$side extra=()
			[ "$side" = before ] && [ -z "$NBDSNAP_BEFORE" ] && extra=(--no-extents)
			rm -f "$work/copy.img"
			t0=$EPOCHREALTIME
			nbdcopy "$@" "${extra[@]}" "nbd+unix:///s?socket=$d/sock" "$work/copy.img"
			t=$(echo "$EPOCHREALTIME - $t0" | bc -l)
			alloc=$(stat -c '%b * %B / 1048576' "$work/copy.img" | bc)
			if [ "$side" = ours ]; then o+=("$t") oa+=("$alloc"); else b+=("$t") ba+=("$alloc"); fi
		done
		echo "bench: $label run $i: ours ${o[-1]}s ${oa[-1]} MiB, before ${b[-1]}s ${ba[-1]} MiB" >&2
	done
	rm -f "$work/copy.img"
	local mo mb
	mo=$(printf '%s\n' "${o[@]}" | median)
	mb=$(printf '%s\n' "${b[@]}" | median)
	sparse_rows+=("$(printf '| %s | %.3f | %.3f | %.2fx | %s | %s | %s / %s |' "$label" "$mo" "$mb" \
		"$(echo "$mo / $mb" | bc -l)" "$(printf '%s\n' "${oa[@]}" | median)" "$(printf '%s\n' "${ba[@]}" | median)" \
		"$(printf '%.3f ' "${o[@]}")" "$(printf '%.3f ' "${b[@]}")")")
}
sparse_bench() {
	echo "bench: sparse copy (nbdcopy of a snapshot of a 90%-sparse 1 GiB origin)" >&2
	mkdir -p "$work/sparse-ours" "$work/sparse-before"
	truncate -s 1G "$work/sparse-ours/origin.img"
	local off
	for off in $(seq 0 10 1023); do
		head -c 1M /dev/urandom | dd of="$work/sparse-ours/origin.img" bs=1M seek="$off" conv=notrunc status=none
	done
	cp --sparse=always "$work/sparse-ours/origin.img" "$work/sparse-before/origin.img"
	start_snapd "$work/sparse-ours" "$NBDSNAP"
	start_snapd "$work/sparse-before" "${NBDSNAP_BEFORE:-$NBDSNAP}"
	sparse_copy "snapshot → file, nbdcopy defaults"
	sparse_copy "snapshot → file, nbdcopy -S 0" -S 0
	stop_all
	rm -rf "$work/sparse-ours" "$work/sparse-before"
}

if [ "$SCENARIOS" = sparse ]; then
	sparse_bench
	{
		echo "nbdsnap bench, sparse copy only, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, medians of $RUNS runs;" \
			"ours = $NBDSNAP, before = ${NBDSNAP_BEFORE:-$NBDSNAP with nbdcopy --no-extents}, nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}')"
		echo
		echo "| copy | ours s | before s | ours/before | ours MiB held | before MiB held | runs ours / before (s) |"
		echo "|---|---|---|---|---|---|---|"
		printf '%s\n' "${sparse_rows[@]}"
	} | tee "$OUT"
	exit 0
fi

# --- Built-in scenarios: file served as is. ---
start_ours "$work/ours.sock"
start_nbdkit "$work/kit.sock" file "$FILE"
compare "4k randread QD32" iops "$work/ours.sock" "$work/kit.sock" --rw=randread --bs=4k --iodepth=32
compare "4k randwrite QD32" iops "$work/ours.sock" "$work/kit.sock" --rw=randwrite --bs=4k --iodepth=32
compare "1M seq read QD8" MiB/s "$work/ours.sock" "$work/kit.sock" --rw=read --bs=1M --iodepth=8
compare "1M seq write QD8" MiB/s "$work/ours.sock" "$work/kit.sock" --rw=write --bs=1M --iodepth=8
stop_all

# --- TLS: the same reads with both servers requiring TLS (certificates
# made here with openssl: a CA, and a server certificate for localhost). ---
TLS=$work/tls
mkdir -p "$TLS/.pki/libnbd"
chmod 755 "$work" "$TLS" "$TLS/.pki" "$TLS/.pki/libnbd"
(
	cd "$TLS"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
		-keyout ca-key.pem -out ca-cert.pem 2>/dev/null
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
		-keyout server-key.pem -out server.csr 2>/dev/null
	printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
	openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
		-extfile san.ext -out server-cert.pem 2>/dev/null
	cp ca-cert.pem .pki/libnbd/ && chmod 644 .pki/libnbd/ca-cert.pem
)
start_ours "$work/ours.sock" -tls-cert "$TLS/server-cert.pem" -tls-key "$TLS/server-key.pem" -tls-required
start_nbdkit "$work/kit.sock" --tls=require --tls-certificates="$TLS" file "$FILE"
chmod 666 "$work/ours.sock" "$work/kit.sock" # fio runs as nobody
compare "4k randread QD32, TLS" iops "$work/ours.sock" "$work/kit.sock" --rw=randread --bs=4k --iodepth=32
compare "1M seq read QD8, TLS" MiB/s "$work/ours.sock" "$work/kit.sock" --rw=read --bs=1M --iodepth=8
stop_all
TLS=""

# --- 1 ms of backend latency: proves requests are served in parallel. ---
start_ours "$work/ours.sock" -latency 1ms
start_nbdkit "$work/kit.sock" --filter=delay file "$FILE" rdelay=1ms wdelay=1ms
compare "4k randread QD32, 1 ms backend latency" iops "$work/ours.sock" "$work/kit.sock" --rw=randread --bs=4k --iodepth=32
stop_all

sparse_bench

for f in test/bench/scenarios.d/*.sh; do
	[ "$SCENARIOS" = builtin ] && break
	[ -e "$f" ] || continue
	# shellcheck source=/dev/null
	. "$f"
	stop_all
done

{
	echo "nbdsnap bench, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, file $SIZE in /dev/shm," \
		"medians of $RUNS fio runs of ${RUNTIME}s; ours = internal/nbdsrv (test/bench/fileserver), ref = nbdkit $(nbdkit --version | awk '{print $2}');" \
		"in the backup rows (scenarios.d/backup.sh, medians of $RUNS copies), ours = an incremental copy through qemu:dirty-bitmap, ref = a full nbdcopy;" \
		"in the rollback rows (scenarios.d/rollback.sh), ours = nbdsnap rollback --wait, ref = nbdcopy of the snapshot's export onto the origin export;" \
		"in the held-writes rows (scenarios.d/heldwrites.sh), ours and ref are the modes the row names"
	echo
	echo "| scenario | ours | ref | unit | ours/ref | runs ours / ref |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
	echo
	echo "What TLS costs each server: the TLS rows' medians over the plain ones."
	echo
	echo "| scenario | ours TLS/plain | ref TLS/plain |"
	echo "|---|---|---|"
	for l in "4k randread QD32" "1M seq read QD8"; do
		printf '| %s | %.2fx | %.2fx |\n' "$l" \
			"$(echo "${med[$l, TLS/ours]} / ${med[$l/ours]}" | bc -l)" \
			"$(echo "${med[$l, TLS/ref]} / ${med[$l/ref]}" | bc -l)"
	done
	echo
	echo "Sparse copy: nbdcopy of a snapshot export of a 90%-sparse 1 GiB origin to a file in /dev/shm;" \
		"ours = $NBDSNAP, before = ${NBDSNAP_BEFORE:-$NBDSNAP with nbdcopy --no-extents}."
	echo
	echo "| copy | ours s | before s | ours/before | ours MiB held | before MiB held | runs ours / before (s) |"
	echo "|---|---|---|---|---|---|---|"
	printf '%s\n' "${sparse_rows[@]}"
} | tee "$OUT"
