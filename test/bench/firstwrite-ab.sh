#!/usr/bin/env bash
# A/B of two nbdsnap binaries on first writes under a fresh snapshot,
# persistent and transient, on a disk (default /var/tmp): the cost of
# persistence is the ratio persistent/transient of each binary. Each sample
# starts a daemon on a 1 GiB origin, takes a snapshot with 64K clusters and
# runs one fio --ioengine=nbd pass that writes every cluster it touches for
# the first time; the samples alternate A-persistent, A-transient,
# B-persistent, B-transient so that drift hits all alike. Prints the
# samples, the medians and the ratios. Not part of `make test`.
#
#   test/bench/firstwrite-ab.sh OLD-BINARY NEW-BINARY
#
# Environment: RUNS (default 5), DIR for the origin and the stores (default
# /var/tmp), JOB: qd1 (default: 4k writes at QD1, one per 64K cluster, 8192
# of them), qd32 (64K random writes at QD32 over 512 MiB) or fsync8 (4k random
# writes at QD1 over 64 MiB with a FLUSH every 8 writes).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY-A BINARY-B" >&2; exit 2; }
bins=("$(realpath "$1")" "$(realpath "$2")")
RUNS=${RUNS:-5}
DIR=${DIR:-/var/tmp}
JOB=${JOB:-qd1}
for tool in fio jq; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
case $JOB in
qd1) fioargs=(--rw=write:60k --bs=4k --iodepth=1 --size=512M) unit=iops ;;
qd32) fioargs=(--rw=randwrite --bs=64k --iodepth=32 --size=512M) unit=bw ;;
fsync8) fioargs=(--rw=randwrite --bs=4k --iodepth=1 --size=64M --fsync=8) unit=iops ;;
*) echo "JOB=$JOB: qd1, qd32 or fsync8" >&2; exit 2 ;;
esac

work=$(mktemp -d "$DIR/nbdsnap-fw-ab.XXXXXX")
# The sockets on tmpfs, as under /run/nbdsnap (what the daemon keeps next to
# its control socket must not compete with the disk being measured).
run=$(mktemp -d /dev/shm/nbdsnap-fw-ab.XXXXXX)
pid=""
cleanup() {
	[ -n "$pid" ] && kill "$pid" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$work" "$run"
}
trap cleanup EXIT
head -c 1G /dev/urandom >"$work/origin.img"
sync

fio_json() { # fio prints lines before its JSON with the nbd engine
	fio --name=bench --ioengine=nbd --numjobs=1 --output-format=json "$@" | sed -n '/^{/,$p'
}

# sample BINARY MODE: one fresh daemon and snapshot, one pass; prints the figure.
sample() {
	local bin=$1 mode=$2 d=$work/run r=$run/run
	rm -rf "$d" "$r" && mkdir -p "$d" "$r"
	# Each sample starts with nothing dirty: the previous one's writes
	# would otherwise be written back during this one.
	sync
	"$bin" serve "$work/origin.img" --name fw --listen "unix:$r/sock" --control "$r/fw.ctl" \
		--state-dir "$d/state" --log-level error &
	pid=$!
	for _ in $(seq 500); do [ -S "$r/fw.ctl" ] && break; sleep 0.01; done
	local flags=()
	[ "$mode" = transient ] && flags=(--transient)
	"$bin" create snap --control "$r/fw.ctl" --backing "$d/snap.cow" --cluster-size 64K "${flags[@]}" >/dev/null
	fio_json --uri="nbd+unix:///fw?socket=$r/sock" "${fioargs[@]}" |
		jq "if \"$unit\" == \"iops\" then .jobs[0].write.iops else .jobs[0].write.bw_bytes / 1048576 end"
	kill "$pid"
	wait "$pid" || true
	pid=""
}

declare -A s
for r in $(seq "$RUNS"); do
	for i in 0 1; do
		for mode in persistent transient; do
			v=$(sample "${bins[$i]}" $mode)
			printf 'run %d %s %s: %.0f %s\n' "$r" "$([ $i = 0 ] && echo A || echo B)" "$mode" "$v" "$unit"
			s[$i-$mode]+="$v "
		done
	done
done
median() { printf '%s\n' $1 | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
echo "job $JOB (${fioargs[*]}), $DIR, $RUNS runs"
for i in 0 1; do
	p=$(median "${s[$i-persistent]}")
	t=$(median "${s[$i-transient]}")
	printf '%s %s: persistent median %.0f (%s), transient median %.0f (%s), persistent/transient %.3f\n' \
		"$([ $i = 0 ] && echo A || echo B)" "${bins[$i]}" "$p" "${s[$i-persistent]% }" "$t" "${s[$i-transient]% }" \
		"$(awk -v a="$p" -v b="$t" 'BEGIN { print a / b }')"
done
pa=$(median "${s[0-persistent]}")
pb=$(median "${s[1-persistent]}")
awk -v a="$pa" -v b="$pb" 'BEGIN { printf "persistent B/A %.3f\n", b / a }'
