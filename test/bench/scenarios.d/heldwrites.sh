# shellcheck shell=bash
# Sourced by test/bench/run.sh after its built-in scenarios (and by
# `test/bench/scenario.sh heldwrites`, which runs it alone): the "held
# writes" rows.
# What a persistent snapshot's first writes cost next to a transient one's,
# with held writes (the default: a first write is answered once its old
# cluster is cached, its origin write held until the commit) and without
# (--held-size 0: every first write waits for its commit).
#
# Per location (HELD_LOCATIONS, default disk=/var/tmp,tmpfs=/dev/shm; origin
# and store there, sockets and the held-writes log on /dev/shm as under
# /run/nbdsnap) and job, RUNS samples of each mode, alternating, each on a
# fresh daemon and snapshot (64 KiB clusters) over one origin of HELD_SIZE
# random bytes, fio --ioengine=nbd on one connection:
#   - qd1: 4k writes at QD1, one per 64 KiB cluster (--rw=write:60k), a
#     HELD_PASS pass: every write is a first write;
#   - qd32: 64k random writes at QD32 over HELD_PASS;
#   - fsync8: 4k random writes at QD1 over 64 MiB with a FLUSH every 8
#     writes, where held writes cannot hide the syncs; also against QEMU
#     image fleecing (qemu-storage-daemon, copy-before-write, never synced)
#     for reference.
# Modes: held, unheld (--held-size 0), transient (--transient). `sync`
# before each sample, so that the previous one's dirty pages are not
# written back during it.
#
# The ceiling: what the location's file system makes durable when written
# the way a persistent store writes its data (fio on a new file, not
# preallocated: 64k appends, fdatasync every 96 of them as a commit of
# 6 MiB, write-behind every 16 as backstore asks; HELD_PASS), against the
# copies transient first writes put in the page cache per second (qd1:
# IOPS x 64 KiB; qd32: its MiB/s): a persistent snapshot must make those
# copies durable, so where the ratio is under 1 it bounds persistent first
# writes whatever holding hides.
#
# Memory: one 4-connection storm per location and mode (fio --numjobs=4,
# 64k random writes at QD32, HELD_PASS each) to a fresh persistent snapshot;
# the row is the daemon's peak RSS (VmHWM) afterwards, held vs unheld.
#
# A store whose sync costs 2 ms (a disk's flush latency without its
# bandwidth limit): the engine's BenchmarkFirstWriteSyncLatency
# (internal/cow/bench_test.go: origin and store on /dev/shm, every store
# sync 2 ms longer), RUNS counts, the same two first-write jobs without the
# NBD layer; rows: persistent held vs transient and vs unheld (writes per
# second, from the time per write).
#
# Uses RUNS, NBDSNAP and lib.sh's $work, pids, rows, median, bench_forget
# and bench_location_dir; sets scenario_note. Overrides:
# HELD_NBDSNAP (run.sh's NBDSNAP, else bin/nbdsnap; copied), HELD_LOCATIONS,
# HELD_SIZE (1G), HELD_PASS (512M; at least 6M, a commit of the ceiling's fio), HELD_SAMPLES (default
# $work/held-samples.tsv), HELD_BENCHTIME (the engine benchmark's
# -test.benchtime, default 8192x).
for tool in fio jq qemu-storage-daemon go; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
hw=$work/held
mkdir -p "$hw"
cp "${HELD_NBDSNAP:-${NBDSNAP:-bin/nbdsnap}}" "$hw/nbdsnap"
HELD_LOCATIONS=${HELD_LOCATIONS:-disk=/var/tmp,tmpfs=/dev/shm}
HELD_SIZE=${HELD_SIZE:-1G}
HELD_PASS=${HELD_PASS:-512M}
HELD_SAMPLES=${HELD_SAMPLES:-$work/held-samples.tsv}
HELD_BENCHTIME=${HELD_BENCHTIME:-8192x}
echo "bench: held writes: persistent first writes held, not held and transient, fio over NBD" >&2

hw_pid=""

# hw_fio prints fio's JSON (fio prints lines before it with the nbd engine).
hw_fio() { fio --name=bench --ioengine=nbd --output-format=json "$@" | sed -n '/^{/,$p'; }
hw_job() {
	case $1 in
	qd1) echo "--rw=write:60k --bs=4k --iodepth=1 --size=$HELD_PASS" ;;
	qd32) echo "--rw=randwrite --bs=64k --iodepth=32 --size=$HELD_PASS" ;;
	fsync8) echo "--rw=randwrite --bs=4k --iodepth=1 --size=64M --fsync=8" ;;
	storm) echo "--rw=randwrite --bs=64k --iodepth=32 --size=$HELD_PASS --numjobs=4 --group_reporting" ;;
	esac
}
# hw_up DIR MODE starts a server on a fresh copy of DIR's template and sets
# hw_pid and hw_uri.
hw_up() {
	local dir=$1 mode=$2 r=$hw/run
	rm -rf "$dir/run" "$r"
	mkdir -p "$dir/run" "$r"
	cp "$dir/template.img" "$dir/run/origin.img"
	sync
	if [ "$mode" = qemu ]; then
		truncate -s "$(stat -c %s "$dir/template.img")" "$dir/run/cow.img"
		qemu-storage-daemon --blockdev "driver=file,node-name=ofile,filename=$dir/run/origin.img" \
			--blockdev "driver=file,node-name=tfile,filename=$dir/run/cow.img" \
			--blockdev "driver=copy-before-write,node-name=cbw,file=ofile,target=tfile,on-cbw-error=break-snapshot" \
			--blockdev "driver=raw,node-name=origin,file=cbw" \
			--nbd-server "addr.type=unix,addr.path=$r/sock" \
			--export "type=nbd,id=e0,node-name=origin,name=origin,writable=on" >"$r/log" 2>&1 &
		hw_pid=$!
		pids+=("$hw_pid")
		for _ in $(seq 500); do [ -S "$r/sock" ] && break; sleep 0.01; done
		hw_uri="nbd+unix:///origin?socket=$r/sock"
		return
	fi
	local flags=() cflags=()
	[ "$mode" = unheld ] && flags=(--held-size 0)
	[ "$mode" = transient ] && cflags=(--transient)
	"$hw/nbdsnap" serve "$dir/run/origin.img" --name hw --listen "unix:$r/sock" --control "$r/hw.ctl" \
		--state-dir "$dir/run/state" --log-level error "${flags[@]}" >"$r/log" 2>&1 &
	hw_pid=$!
	pids+=("$hw_pid")
	for _ in $(seq 500); do "$hw/nbdsnap" status --control "$r/hw.ctl" >/dev/null 2>&1 && break; sleep 0.01; done
	"$hw/nbdsnap" create snap --control "$r/hw.ctl" --backing "$dir/run/snap.cow" --cluster-size 64K "${cflags[@]}" >/dev/null
	hw_uri="nbd+unix:///hw?socket=$r/sock"
}
hw_down() {
	kill "$hw_pid"
	wait "$hw_pid" || { echo "bench: held writes: the server did not stop cleanly:" >&2; cat "$hw/run/log" >&2; exit 1; }
	bench_forget "$hw_pid"
	hw_pid=""
}
# hw_sample LOCATION DIR JOB MODE RUN appends a sample: IOPS (qd1, fsync8),
# MiB/s (qd32) or peak RSS in MiB (storm).
hw_sample() {
	local loc=$1 dir=$2 job=$3 mode=$4 i=$5 v
	hw_up "$dir" "$mode"
	# shellcheck disable=SC2046 # the job's arguments are words
	v=$(hw_fio --uri="$hw_uri" $(hw_job "$job") |
		jq ".jobs[0].write | if \"$job\" == \"qd32\" then .bw_bytes / 1048576 else .iops end")
	if [ "$job" = storm ]; then
		v=$(awk '$1 == "VmHWM:" { print $2 / 1024 }' "/proc/$hw_pid/status")
	fi
	hw_down
	printf '%s\t%s\t%s\t%s\t%.1f\n' "$loc" "$job" "$mode" "$i" "$v" | tee -a "$HELD_SAMPLES" >&2
}

printf 'location\tjob\tmode\trun\tvalue\n' >"$HELD_SAMPLES"
hw_locs=()
IFS=, read -r -a hw_spec <<<"$HELD_LOCATIONS"
for spec in "${hw_spec[@]}"; do
	loc=${spec%%=*}
	bench_location_dir "held-$loc" "${spec#*=}"
	dir=$loc_dir
	hw_locs+=("$loc")
	echo "bench: held writes: $loc: writing a $HELD_SIZE template of random data in $dir" >&2
	head -c "$HELD_SIZE" /dev/urandom >"$dir/template.img"
	for i in $(seq "$RUNS"); do
		for job in qd1 qd32 fsync8; do
			modes=(held unheld transient)
			[ "$job" = fsync8 ] && modes+=(qemu)
			[ $((i % 2)) = 0 ] && modes=($(printf '%s\n' "${modes[@]}" | tac))
			for m in "${modes[@]}"; do hw_sample "$loc" "$dir" "$job" "$m" "$i"; done
		done
	done
	for m in held unheld; do hw_sample "$loc" "$dir" storm "$m" 1; done
	for i in $(seq "$RUNS"); do
		sync
		v=$(fio --name=sync --rw=write --bs=64k --fallocate=none --fdatasync=96 --sync_file_range=write:16 \
			--size="$HELD_PASS" --filename="$dir/synced.img" \
			--output-format=json | jq '.jobs[0].write.bw_bytes / 1048576')
		rm -f "$dir/synced.img"
		printf '%s\tsynced\tfio\t%s\t%.1f\n' "$loc" "$i" "$v" | tee -a "$HELD_SAMPLES" >&2
	done
	rm -rf "$dir"
done
scenario_note="ours and ref are the modes each row names; locations $HELD_LOCATIONS, passes of $HELD_PASS over $HELD_SIZE"

echo "bench: held writes: the engine alone, with a store whose sync takes 2 ms and on /var/tmp (BenchmarkFirstWriteSyncLatency, BenchmarkFirstWriteDiskModes)" >&2
go test -c -o "$hw/cow.test" ./internal/cow
(cd "$hw" && ./cow.test -test.run '^$' -test.bench 'BenchmarkFirstWriteSyncLatency|BenchmarkFirstWriteDiskModes' \
	-test.benchtime "$HELD_BENCHTIME" -test.count "$RUNS") |
	awk '/^BenchmarkFirstWrite(SyncLatency|DiskModes)\// {
		split($1, n, "/"); sub(/-[0-9]+$/, "", n[3])
		print (n[1] == "BenchmarkFirstWriteSyncLatency" ? "synclat2ms" : "enginedisk") "\t" n[2] "\t" n[3] "\t-\t" 1e9 / $3
	}' | tee -a "$HELD_SAMPLES" >&2

# hw_col LOCATION JOB MODE prints the samples of one mode, one a line.
hw_col() { awk -F'\t' -v l="$1" -v j="$2" -v m="$3" '$1 == l && $2 == j && $3 == m { print $5 }' "$HELD_SAMPLES"; }
# hw_row LABEL LOCATION JOB OURS REF UNIT: a row of medians, ours/ref.
hw_row() {
	local a b
	a=$(hw_col "$2" "$3" "$4" | median)
	b=$(hw_col "$2" "$3" "$5" | median)
	rows+=("$(printf '| %s | %.1f | %.1f | %s | %.3fx | %s / %s |' "$1" "$a" "$b" "$6" "$(echo "$a / $b" | bc -l)" \
		"$(printf '%.0f ' $(hw_col "$2" "$3" "$4"))" "$(printf '%.0f ' $(hw_col "$2" "$3" "$5"))")")
}
for loc in "${hw_locs[@]}"; do
	hw_row "held writes, $loc, first writes 4k QD1 one per cluster: persistent (held) vs transient" "$loc" qd1 held transient IOPS
	hw_row "held writes, $loc, first writes 4k QD1 one per cluster: persistent held vs not held" "$loc" qd1 held unheld IOPS
	hw_row "held writes, $loc, first writes 64k random QD32: persistent (held) vs transient" "$loc" qd32 held transient MiB/s
	hw_row "held writes, $loc, first writes 64k random QD32: persistent held vs not held" "$loc" qd32 held unheld MiB/s
	hw_row "held writes, $loc, 4k random QD1 fsync=8: persistent (held) vs transient" "$loc" fsync8 held transient IOPS
	hw_row "held writes, $loc, 4k random QD1 fsync=8: persistent (held) vs QEMU fleecing" "$loc" fsync8 held qemu IOPS
	hw_row "held writes, $loc, 4k random QD1 fsync=8: transient vs QEMU fleecing" "$loc" fsync8 transient qemu IOPS
	hw_row "held writes, $loc, peak RSS after a 4-connection 64k QD32 storm: held vs not held" "$loc" storm held unheld MiB
	synced=$(hw_col "$loc" synced fio | median)
	copies1=$(echo "$(hw_col "$loc" qd1 transient | median) * 64 / 1024" | bc -l)
	copies32=$(hw_col "$loc" qd32 transient | median)
	rows+=("$(printf '| held writes, %s, ceiling: synced write bandwidth as a store writes (fio 64k appends, fdatasync each 6M) vs the copies of transient first writes, 4k QD1 one per cluster | %.0f | %.0f | MiB/s | %.3fx | %s |' \
		"$loc" "$synced" "$copies1" "$(echo "$synced / $copies1" | bc -l)" "$(printf '%.0f ' $(hw_col "$loc" synced fio))")")
	rows+=("$(printf '| held writes, %s, ceiling: synced write bandwidth as a store writes (fio 64k appends, fdatasync each 6M) vs the copies of transient first writes, 64k QD32 | %.0f | %.0f | MiB/s | %.3fx | %s |' \
		"$loc" "$synced" "$copies32" "$(echo "$synced / $copies32" | bc -l)" "$(printf '%.0f ' $(hw_col "$loc" synced fio))")")
done
for job in 4k-qd1 64k-qd32; do
	hw_row "held writes, engine, store sync +2 ms, first writes $job: persistent (held) vs transient" synclat2ms "$job" persistent transient writes/s
	hw_row "held writes, engine, store sync +2 ms, first writes $job: persistent held vs not held" synclat2ms "$job" persistent persistent-unheld writes/s
	hw_row "held writes, engine, /var/tmp, first writes $job: persistent (held) vs transient" enginedisk "$job" persistent transient writes/s
	hw_row "held writes, engine, /var/tmp, first writes $job: persistent held vs not held" enginedisk "$job" persistent persistent-unheld writes/s
done
