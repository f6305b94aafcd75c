# shellcheck shell=bash
# Sourced by test/bench/run.sh after its built-in scenarios (and by
# `test/bench/scenario.sh rollback`, which runs it alone): the "rollback" rows. How
# fast `nbdsnap rollback` puts a snapshot's content back onto the origin,
# against doing the same with stock tools.
#
# Per location (ROLLBACK_LOCATIONS, default tmpfs=/dev/shm,disk=/var/tmp;
# origin, store and template on the same file system) one SIZE template of
# random data; then RUNS times, each method on a fresh setup (the template
# copied to the origin, a daemon started, persistent snapshot s1 with
# 64 KiB clusters, ROLLBACK_CHANGED percent (default 50) of the clusters
# overwritten whole with random data through the origin export, 16 writes
# in flight on one libnbd connection, so that s1 holds that much in
# copies), in alternating order so that drift hits both alike:
#   - ours: `nbdsnap rollback s1 --wait` (the copy back is complete and
#     synced when it returns);
#   - ref: `nbdcopy --flush` of s1's export onto the origin export, no
#     rollback: every cluster, SIZE bytes, and copy-on-write into s1 of
#     the clusters not yet preserved. --flush makes the origin durable at
#     the end, as the rollback's last checkpoint does.
# A fresh setup rather than a restored state: the reference's writes make
# s1 preserve every other cluster too, and a second rollback to s1 would
# then copy all of them back.
#
# After each sample the origin export and s1's export (nbdcopy to a pipe)
# and the origin file itself must equal the template (cmp), or the run
# fails. `sync` before the clock starts, so that the setup's dirty pages
# are not written back during the measurement.
#
# Measured: wall time, the bytes put back (ours: the rollback's
# total_bytes, checked to be the clusters written; ref: SIZE), the
# daemon's own copy time (ours: finished - started in the rollback's
# status; --wait polls every 200 ms, so the wall time is up to that much
# above it), and from /proc/PID of the daemon during the sample: CPU
# seconds, read and write syscalls (syscr, syscw), and the bytes s1's
# copy-on-write preserved (bytes_copied in its stats). The rows per
# location: wall time and throughput (bytes put back / wall time),
# medians, in run.sh's table (ours = rollback, ref = nbdcopy); the samples
# go to ROLLBACK_SAMPLES (default $work/rollback-samples.tsv).
#
# Uses RUNS, SIZE, NBDSNAP and lib.sh's $work, pids, rows, median,
# bench_forget and bench_location_dir; sets scenario_note.
# Overrides: ROLLBACK_NBDSNAP (run.sh's NBDSNAP, else bin/nbdsnap; copied,
# so that a rebuild during the run does not change it), ROLLBACK_LOCATIONS,
# ROLLBACK_CHANGED, ROLLBACK_SEED (1; run i of a location writes with seed
# ROLLBACK_SEED+i, the same clusters for both methods).
for tool in nbdcopy jq bc cmp; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || { echo "bench: python3-libnbd is not installed (make deps)" >&2; exit 1; }
rb=$work/rollback
mkdir -p "$rb"
cp "${ROLLBACK_NBDSNAP:-${NBDSNAP:-bin/nbdsnap}}" "$rb/nbdsnap"
ROLLBACK_LOCATIONS=${ROLLBACK_LOCATIONS:-tmpfs=/dev/shm,disk=/var/tmp}
ROLLBACK_CHANGED=${ROLLBACK_CHANGED:-50}
ROLLBACK_SEED=${ROLLBACK_SEED:-1}
ROLLBACK_SAMPLES=${ROLLBACK_SAMPLES:-$work/rollback-samples.tsv}
echo "bench: rollback: nbdsnap rollback --wait vs nbdcopy of the snapshot onto the origin, $ROLLBACK_CHANGED% of the 64 KiB clusters of $SIZE changed" >&2

cat >"$rb/write.py" <<'EOF'
import nbd, os, random, sys
uri, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cs = 65536
clusters = h.get_size() // cs
n = max(1, int(clusters * pct / 100))
for c in sorted(random.Random(seed).sample(range(clusters), n)):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    # The callback retires the command (and frees its buffer) when done.
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(cs))), c * cs, completion=lambda err: 1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
print(n)
EOF

rb_pid=""
rb_uri() { echo "nbd+unix:///$1?socket=$rb_d/sock"; }
# rb_proc prints the daemon's CPU ticks (utime + stime), syscr and syscw.
rb_proc() {
	printf '%s %s %s\n' "$(awk '{print $14 + $15}' "/proc/$rb_pid/stat")" \
		"$(awk '$1 == "syscr:" {print $2}' "/proc/$rb_pid/io")" "$(awk '$1 == "syscw:" {print $2}' "/proc/$rb_pid/io")"
}
rb_copied() { "$rb/nbdsnap" status --control "$rb_d/ctl" --json | jq '.snapshots[] | select(.name == "s1") | .stats.bytes_copied'; }
# rb_setup DIR SEED: a fresh origin from the template in DIR, a daemon
# (rb_pid), snapshot s1, the clusters written (rb_written).
rb_setup() {
	rb_d=$1/run
	rm -rf "$rb_d"
	mkdir -p "$rb_d"
	cp "$1/template.img" "$rb_d/origin.img"
	"$rb/nbdsnap" serve "$rb_d/origin.img" --name rb --listen "unix:$rb_d/sock" --control "$rb_d/ctl" \
		--state-dir "$rb_d/state" --log-level warn >"$rb_d/log" 2>&1 &
	rb_pid=$!
	pids+=("$rb_pid")
	for _ in $(seq 500); do "$rb/nbdsnap" status --control "$rb_d/ctl" >/dev/null 2>&1 && break; sleep 0.01; done
	"$rb/nbdsnap" create s1 --control "$rb_d/ctl" --backing "$rb_d/s1.cow" --cluster-size 64K >/dev/null
	rb_written=$(/usr/bin/python3 "$rb/write.py" "$(rb_uri rb)" "$ROLLBACK_CHANGED" "$2")
	# The writer's connection is gone once the daemon says so; a rollback
	# is refused while the origin export is open.
	for _ in $(seq 500); do
		[ "$("$rb/nbdsnap" status --control "$rb_d/ctl" --json | jq .open_connections)" = 0 ] && break
		sleep 0.01
	done
	sync
}
rb_teardown() {
	kill "$rb_pid"
	wait "$rb_pid" || { echo "bench: rollback: the daemon did not stop cleanly:" >&2; cat "$rb_d/log" >&2; exit 1; }
	bench_forget "$rb_pid"
	rb_pid=""
	rm -rf "$rb_d"
}
rb_check() {
	local what=$1 tmpl=$2
	nbdcopy "$(rb_uri rb)" - | cmp -s - "$tmpl" || { echo "bench: rollback: $what: the origin export is not s1's image" >&2; exit 1; }
	nbdcopy "$(rb_uri s1)" - | cmp -s - "$tmpl" || { echo "bench: rollback: $what: s1's export is not its image" >&2; exit 1; }
	cmp -s "$rb_d/origin.img" "$tmpl" || { echo "bench: rollback: $what: the origin file is not s1's image" >&2; exit 1; }
}
# rb_measure LOCATION DIR METHOD RUN appends a sample.
rb_measure() {
	local loc=$1 dir=$2 m=$3 i=$4 t0 t1 p0 p1 c0 c1 bytes copy=""
	rb_setup "$dir" $((ROLLBACK_SEED + i))
	c0=$(rb_copied)
	p0=$(rb_proc)
	t0=$EPOCHREALTIME
	if [ "$m" = ours ]; then
		"$rb/nbdsnap" rollback s1 --control "$rb_d/ctl" --wait --json >"$rb_d/rollback.json"
	else
		nbdcopy --flush "$(rb_uri s1)" "$(rb_uri rb)"
	fi
	t1=$EPOCHREALTIME
	p1=$(rb_proc)
	c1=$(rb_copied)
	if [ "$m" = ours ]; then
		local last
		last=$(tail -1 "$rb_d/rollback.json")
		[ "$(jq -r .state <<<"$last")" = done ] || { echo "bench: rollback: run $i did not end done: $last" >&2; exit 1; }
		bytes=$(jq .total_bytes <<<"$last")
		[ "$bytes" = $((rb_written * 65536)) ] || { echo "bench: rollback: $bytes bytes to copy back, $rb_written clusters written" >&2; exit 1; }
		copy=$(printf '%.6f' "$(echo "$(date -d "$(jq -r .finished <<<"$last")" +%s.%N) - $(date -d "$(jq -r .started <<<"$last")" +%s.%N)" | bc -l)")
	else
		bytes=$(stat -c %s "$rb_d/origin.img")
	fi
	rb_check "$loc $m run $i" "$dir/template.img"
	read -r -a p0 <<<"$p0"
	read -r -a p1 <<<"$p1"
	printf '%s\t%s\t%s\t%.6f\t%s\t%s\t%.2f\t%s\t%s\t%s\n' "$loc" "$m" "$i" "$(echo "$t1 - $t0" | bc -l)" "$bytes" \
		"${copy:--}" "$(echo "(${p1[0]} - ${p0[0]}) / $(getconf CLK_TCK)" | bc -l)" \
		"$((p1[1] - p0[1]))" "$((p1[2] - p0[2]))" "$((c1 - c0))" | tee -a "$ROLLBACK_SAMPLES" >&2
	rb_teardown
}

printf 'location\tmethod\trun\tseconds\tbytes_put_back\tdaemon_copy_seconds\tdaemon_cpu_seconds\tdaemon_syscr\tdaemon_syscw\ts1_cow_bytes\n' >"$ROLLBACK_SAMPLES"
rb_locs=()
IFS=, read -r -a rb_spec <<<"$ROLLBACK_LOCATIONS"
for spec in "${rb_spec[@]}"; do
	loc=${spec%%=*}
	bench_location_dir "rollback-$loc" "${spec#*=}"
	dir=$loc_dir
	rb_locs+=("$loc")
	echo "bench: rollback: $loc: writing a $SIZE template of random data in $dir" >&2
	head -c "$SIZE" /dev/urandom >"$dir/template.img"
	for i in $(seq "$RUNS"); do
		order=(ours ref)
		[ $((i % 2)) = 0 ] && order=(ref ours)
		for m in "${order[@]}"; do rb_measure "$loc" "$dir" "$m" "$i"; done
	done
	rm -rf "$dir"
done
scenario_note="ours = nbdsnap rollback s1 --wait, ref = nbdcopy --flush of s1's export onto the origin export (nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}')), $ROLLBACK_CHANGED% of the 64 KiB clusters of $SIZE changed since s1, locations $ROLLBACK_LOCATIONS, a fresh setup per sample"

# rb_col LOCATION METHOD COLUMN prints the samples of one method, one a line.
rb_col() { awk -F'\t' -v l="$1" -v m="$2" -v c="$3" '$1 == l && $2 == m { print $c }' "$ROLLBACK_SAMPLES"; }
# rb_rate LOCATION METHOD prints each sample's MiB/s.
rb_rate() { awk -F'\t' -v l="$1" -v m="$2" '$1 == l && $2 == m { print $5 / 1048576 / $4 }' "$ROLLBACK_SAMPLES"; }
for loc in "${rb_locs[@]}"; do
	label="rollback, $ROLLBACK_CHANGED% of 64 KiB clusters changed, $loc: nbdsnap rollback --wait vs nbdcopy --flush s1 → origin export"
	so=$(rb_col "$loc" ours 4 | median)
	sr=$(rb_col "$loc" ref 4 | median)
	rows+=("$(printf '| %s, wall time | %.3f | %.3f | s | %.3fx | %s / %s |' "$label" "$so" "$sr" \
		"$(echo "$so / $sr" | bc -l)" "$(printf '%.3f ' $(rb_col "$loc" ours 4))" "$(printf '%.3f ' $(rb_col "$loc" ref 4))")")
	ro=$(rb_rate "$loc" ours | median)
	rr=$(rb_rate "$loc" ref | median)
	rows+=("$(printf '| %s, throughput (bytes put back / wall time) | %.0f | %.0f | MiB/s | %.2fx | %s / %s |' "$label" "$ro" "$rr" \
		"$(echo "$ro / $rr" | bc -l)" "$(printf '%.0f ' $(rb_rate "$loc" ours))" "$(printf '%.0f ' $(rb_rate "$loc" ref))")")
done
