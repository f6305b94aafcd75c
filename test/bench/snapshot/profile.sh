#!/usr/bin/env bash
# Profiles the nbdsnap daemon (CPU, net/http/pprof) under two of the
# benchmark's workloads on a fresh snapshot: 64K randwrite QD32 first writes
# over the whole origin, then a 1M QD8 sequential read of the snapshot.
# Prints fio's throughput and the engine's stats; leaves DIR/fw.pprof and
# DIR/read.pprof for `go tool pprof -top -cum`.
#
# Usage: test/bench/snapshot/profile.sh DIR [--transient]   (DIR: e.g. /dev/shm/prof)
# Environment: SIZE of the origin (default 1G), PPROF address (127.0.0.1:6061).
set -euo pipefail
cd "$(dirname "$0")/../../.."
dir=${1:?usage: profile.sh DIR [--transient]}
transient=${2:-}
SIZE=${SIZE:-1G}
PPROF=${PPROF:-127.0.0.1:6061}
mkdir -p "$dir"
go build -o "$dir/nbdsnap-pprof" ./test/bench/snapshot/nbdsnap-pprof
rm -rf "$dir/state" "$dir/s0.cow" "$dir/s" "$dir/c"
[ -f "$dir/origin.img" ] || head -c "$SIZE" /dev/urandom >"$dir/origin.img"
NBDSNAP_PPROF=$PPROF "$dir/nbdsnap-pprof" serve "$dir/origin.img" --name o --listen "unix:$dir/s" \
	--control "$dir/c" --state-dir "$dir/state" --log-level error &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 500); do [ -S "$dir/c" ] && break; sleep 0.01; done
"$dir/nbdsnap-pprof" create s0 --control "$dir/c" --backing "$dir/s0.cow" $transient >/dev/null

fio_json() { fio --name=p --ioengine=nbd --numjobs=1 --output-format=json "$@" | sed -n '/^{/,$p'; }
curl -s -o "$dir/fw.pprof" "http://$PPROF/debug/pprof/profile?seconds=4" &
c=$!
fio_json --uri="nbd+unix:///o?socket=$dir/s" --rw=randwrite --bs=64k --iodepth=32 --size="$SIZE" |
	jq -c '.jobs[0].write | {first_write_64k_qd32_mib_s: (.bw_bytes/1048576), runtime_ms: .runtime}'
wait $c
curl -s -o "$dir/read.pprof" "http://$PPROF/debug/pprof/profile?seconds=4" &
c=$!
fio_json --uri="nbd+unix:///s0?socket=$dir/s" --rw=read --bs=1M --iodepth=8 --size="$SIZE" --time_based --runtime=4 |
	jq -c '.jobs[0].read | {snapshot_read_1m_qd8_mib_s: (.bw_bytes/1048576)}'
wait $c
"$dir/nbdsnap-pprof" status --control "$dir/c" --json | jq -c '.snapshots[0].stats'
