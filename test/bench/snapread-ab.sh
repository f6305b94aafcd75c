#!/usr/bin/env bash
# A/B of two nbdsnap binaries on a read of the snapshot export, by default
# make bench's 1M sequential read at QD8 of copied clusters (fio
# --ioengine=nbd): the path a change to snapshot reads (such as checking
# every cluster's checksum) costs on. Both daemons run side by
# side, each with its own 1 GiB origin in /dev/shm and a persistent
# snapshot whose first 512 MiB were overwritten (so copied) as in make
# bench; the reads alternate A, B, A, B… so that drift hits both alike.
# Prints the samples and the medians with the ratio B/A. Not part of
# `make test`.
#
#   test/bench/snapread-ab.sh OLD-BINARY NEW-BINARY
#
# Environment: RUNS (default 7), RUNTIME seconds per read (default 10),
# READ the fio arguments of the read (default "--rw=read --bs=1M
# --iodepth=8", make bench's; e.g. "--rw=randread --bs=4k --iodepth=32"),
# UNIT the figure compared (bw in MiB/s, or iops).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY-A BINARY-B" >&2; exit 2; }
bins=("$(realpath "$1")" "$(realpath "$2")")
RUNS=${RUNS:-7}
RUNTIME=${RUNTIME:-10}
READ=${READ:---rw=read --bs=1M --iodepth=8}
UNIT=${UNIT:-bw}
for tool in fio jq; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done

work=$(mktemp -d /dev/shm/nbdsnap-ab.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

fio_json() { # fio prints lines before its JSON with the nbd engine
	fio --name=bench --ioengine=nbd --numjobs=1 --output-format=json "$@" | sed -n '/^{/,$p'
}

for i in 0 1; do
	d=$work/$i
	mkdir -p "$d"
	head -c 1G /dev/urandom >"$d/origin.img"
	"${bins[$i]}" serve "$d/origin.img" --name "ab$i" --listen "unix:$d/sock" --control "$d/ctl" \
		--state-dir "$d/state" --log-level error &
	pids+=($!)
	for _ in $(seq 500); do [ -S "$d/ctl" ] && break; sleep 0.01; done
	"${bins[$i]}" create snap --control "$d/ctl" --backing "$d/snap.cow" --cluster-size 64K >/dev/null
	# The first-write pass of make bench: every 64K block of 512 MiB once.
	fio_json --uri="nbd+unix:///ab$i?socket=$d/sock" --rw=randwrite --bs=64k --iodepth=32 --size=512M >/dev/null
done

unit=MiB/s
[ "$UNIT" = iops ] && unit=IOPS
declare -a a b
for r in $(seq "$RUNS"); do
	for i in 0 1; do
		d=$work/$i
		# shellcheck disable=SC2086 # READ is a list of arguments
		bw=$(fio_json --uri="nbd+unix:///snap?socket=$d/sock" $READ --size=512M \
			--time_based --runtime="$RUNTIME" --ramp_time=1 |
			jq "if \"$UNIT\" == \"iops\" then .jobs[0].read.iops else .jobs[0].read.bw_bytes / 1048576 end")
		printf 'run %d %s: %.0f %s\n' "$r" "$([ $i = 0 ] && echo A || echo B)" "$bw" "$unit"
		if [ $i = 0 ]; then a+=("$bw"); else b+=("$bw"); fi
	done
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
ma=$(median "${a[@]}")
mb=$(median "${b[@]}")
echo "read: $READ"
printf 'A %s: median %.0f %s (%s)\n' "${bins[0]}" "$ma" "$unit" "$(printf '%.0f ' "${a[@]}")"
printf 'B %s: median %.0f %s (%s)\n' "${bins[1]}" "$mb" "$unit" "$(printf '%.0f ' "${b[@]}")"
awk -v a="$ma" -v b="$mb" 'BEGIN { printf "B/A %.3f\n", b / a }'
