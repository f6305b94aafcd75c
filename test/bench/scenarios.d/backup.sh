# shellcheck shell=bash
# Sourced by test/bench/run.sh after its built-in scenarios (and by
# `test/bench/scenario.sh backup`, which runs it alone, in DIR): the
# "backup" rows. What an
# incremental backup through the changed-block contexts costs against a
# full copy of the snapshot.
#
# A SIZE origin of random data in $work, persistent snapshot s1,
# BACKUP_CHANGED percent (default 1) of the 64 KiB clusters then written
# (4 KiB of random data at a random place in each, one libnbd connection),
# snapshot s2. Then RUNS times, in alternating order so that drift hits
# all alike:
#   - full: `nbdcopy` of s2 into a new file;
#   - incremental, libnbd: `nbdinfo --map=qemu:dirty-bitmap:s1 --json` of
#     s2, then one python3-libnbd process reads each dirty extent and
#     writes it into a copy of s1's image;
#   - incremental, dd: the README's recipe: s2 mounted with nbdfuse, the
#     same map, one dd per dirty extent into a copy of s1's image, unmount
#     (skipped when /dev/fuse cannot be opened).
# Each incremental result must equal the full copy (cmp), or the run
# fails. Measured: wall time (map, mount and unmount included) and the
# bytes read from s2's export as the daemon counts them
# (nbdsnap_export_bytes_total{export="s2",cmd="read"}, --metrics-listen).
# The rows: incremental vs full, medians, in run.sh's table (ours =
# incremental, ref = full nbdcopy); the samples go to
# BACKUP_SAMPLES (default $work/backup-samples.tsv).
#
# Uses RUNS, SIZE, NBDSNAP and lib.sh's $work, pids, rows, median and
# bench_mounts; sets scenario_note. Overrides:
# BACKUP_NBDSNAP (run.sh's NBDSNAP, else bin/nbdsnap; copied, so that a
# rebuild during the run does not change it), BACKUP_CHANGED, BACKUP_SEED
# (1).
for tool in nbdcopy nbdinfo jq bc dd cmp; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || { echo "bench: python3-libnbd is not installed (make deps)" >&2; exit 1; }
bk=$work/backup
mkdir -p "$bk/mnt"
bench_mounts+=("$bk/mnt")
cp "${BACKUP_NBDSNAP:-${NBDSNAP:-bin/nbdsnap}}" "$bk/nbdsnap"
BACKUP_CHANGED=${BACKUP_CHANGED:-1}
BACKUP_SAMPLES=${BACKUP_SAMPLES:-$work/backup-samples.tsv}
echo "bench: backup: incremental through qemu:dirty-bitmap vs full nbdcopy, $BACKUP_CHANGED% of the clusters of $SIZE changed" >&2

head -c "$SIZE" /dev/urandom >"$bk/origin.img"
"$bk/nbdsnap" serve "$bk/origin.img" --name bk --listen "unix:$bk/sock" --control "$bk/ctl" \
	--state-dir "$bk/state" --metrics-listen 127.0.0.1:0 >"$bk/log" 2>&1 &
pids+=($!)
for _ in $(seq 500); do "$bk/nbdsnap" status --control "$bk/ctl" >/dev/null 2>&1 && break; sleep 0.01; done
bk_metrics=$(sed -n 's/.* metrics=\([^ ]*\) .*/\1/p' "$bk/log" | head -1)
[ -n "$bk_metrics" ] || { echo "bench: backup: the daemon names no metrics address:" >&2; cat "$bk/log" >&2; exit 1; }
bk_uri() { echo "nbd+unix:///$1?socket=$bk/sock"; }

cat >"$bk/write.py" <<'EOF'
import nbd, random, sys
uri, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
cs = 65536
clusters = h.get_size() // cs
r = random.Random(seed)
n = max(1, int(clusters * pct / 100))
for c in r.sample(range(clusters), n):
    h.pwrite(r.randbytes(4096), c * cs + r.randrange(0, cs, 4096))
h.flush()
h.shutdown()
print(n)
EOF
cat >"$bk/copy.py" <<'EOF'
import json, nbd, os, sys
uri, mapfile, dst = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
fd = os.open(dst, os.O_WRONLY)
for e in json.load(open(mapfile)):
    if e["type"] & 1:
        off, left = e["offset"], e["length"]
        while left:
            n = min(left, 32 << 20)
            os.pwrite(fd, h.pread(n, off), off)
            off, left = off + n, left - n
os.close(fd)
h.shutdown()
EOF

"$bk/nbdsnap" create s1 --control "$bk/ctl" --backing "$bk/s1.cow" >/dev/null
bk_written=$(/usr/bin/python3 "$bk/write.py" "$(bk_uri bk)" "$BACKUP_CHANGED" "${BACKUP_SEED:-1}")
"$bk/nbdsnap" create s2 --control "$bk/ctl" --backing "$bk/s2.cow" >/dev/null
nbdcopy "$(bk_uri s1)" "$bk/s1.img"
nbdcopy "$(bk_uri s2)" "$bk/ref.img"
bk_changed=$("$bk/nbdsnap" diff s1 s2 --control "$bk/ctl" --json | jq .changed_bytes)
echo "bench: backup: $bk_written clusters written, nbdsnap diff s1 s2: $bk_changed bytes changed" >&2

# bk_read prints the bytes read from s2's export so far.
bk_read() {
	/usr/bin/python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
		"http://$bk_metrics/metrics" |
		awk '/^nbdsnap_export_bytes_total\{/ && /export="s2"/ && /cmd="read"/ { n = $2 } END { printf "%.0f\n", n + 0 }'
}
bk_full() {
	rm -f "$bk/out.img"
	nbdcopy "$(bk_uri s2)" "$bk/out.img"
}
bk_libnbd() {
	nbdinfo --map=qemu:dirty-bitmap:s1 --json "$(bk_uri s2)" >"$bk/map.json"
	/usr/bin/python3 "$bk/copy.py" "$(bk_uri s2)" "$bk/map.json" "$bk/out.img"
}
bk_dd() {
	rm -f "$bk/nbdfuse.pid"
	nbdfuse -r -P "$bk/nbdfuse.pid" "$bk/mnt/disk" "$(bk_uri s2)" &
	local fuse=$!
	for _ in $(seq 500); do [ -s "$bk/nbdfuse.pid" ] && break; sleep 0.01; done
	nbdinfo --map=qemu:dirty-bitmap:s1 --json "$(bk_uri s2)" |
		jq -r '.[] | select(.type == 1) | "\(.offset) \(.length)"' |
		while read -r off len; do
			dd if="$bk/mnt/disk" of="$bk/out.img" bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
				conv=notrunc skip="$off" seek="$off" count="$len" status=none
		done
	fusermount3 -u "$bk/mnt"
	wait "$fuse"
}
bk_methods=(full libnbd)
if { exec 3<>/dev/fuse; } 2>/dev/null && command -v nbdfuse >/dev/null; then
	exec 3>&-
	bk_methods+=(dd)
else
	echo "bench: backup: /dev/fuse cannot be opened (or no nbdfuse): no dd row" >&2
fi
# bk_measure METHOD RUN appends "METHOD RUN seconds bytes" to the samples
# and checks the result.
bk_measure() {
	local m=$1 i=$2 b0 b1 t0 t1
	[ "$m" = full ] || cp "$bk/s1.img" "$bk/out.img"
	sync
	b0=$(bk_read)
	t0=$(date +%s.%N)
	"bk_$m"
	t1=$(date +%s.%N)
	b1=$(bk_read)
	cmp "$bk/out.img" "$bk/ref.img" || { echo "bench: backup: $m run $i does not give s2's image" >&2; exit 1; }
	printf '%s\t%s\t%s\t%s\n' "$m" "$i" "$(echo "$t1 - $t0" | bc -l)" "$((b1 - b0))" | tee -a "$BACKUP_SAMPLES" >&2
}
printf 'method\trun\tseconds\tbytes_read\n' >"$BACKUP_SAMPLES"
for i in $(seq "$RUNS"); do
	order=("${bk_methods[@]}")
	if [ $((i % 2)) = 0 ]; then
		order=()
		for ((k = ${#bk_methods[@]} - 1; k >= 0; k--)); do order+=("${bk_methods[k]}"); done
	fi
	for m in "${order[@]}"; do bk_measure "$m" "$i"; done
done

# bk_col METHOD COLUMN prints the samples of one method, one a line.
bk_col() { awk -F'\t' -v m="$1" -v c="$2" '$1 == m { print $c }' "$BACKUP_SAMPLES"; }
bk_full_s=$(bk_col full 3 | median)
bk_full_b=$(bk_col full 4 | median)
for m in "${bk_methods[@]}"; do
	[ "$m" = full ] && continue
	label="incremental via libnbd (nbdinfo --map + one python3-libnbd)"
	[ "$m" = dd ] && label="incremental via dd over nbdfuse (the README's recipe)"
	s=$(bk_col "$m" 3 | median)
	b=$(bk_col "$m" 4 | median)
	rows+=("$(printf '| backup, %s%% of clusters changed: %s vs full nbdcopy, wall time | %.3f | %.3f | s | %.3fx | %s / %s |' \
		"$BACKUP_CHANGED" "$label" "$s" "$bk_full_s" "$(echo "$s / $bk_full_s" | bc -l)" \
		"$(printf '%.3f ' $(bk_col "$m" 3))" "$(printf '%.3f ' $(bk_col full 3))")")
	rows+=("$(printf '| backup, %s%% of clusters changed: %s vs full nbdcopy, bytes read from s2 | %.1f | %.1f | MiB | %.4fx | %s / %s |' \
		"$BACKUP_CHANGED" "$label" "$(echo "$b / 1048576" | bc -l)" "$(echo "$bk_full_b / 1048576" | bc -l)" \
		"$(echo "$b / $bk_full_b" | bc -l)" "$(printf '%.1f ' $(bk_col "$m" 4 | awk '{print $1/1048576}'))" \
		"$(printf '%.1f ' $(bk_col full 4 | awk '{print $1/1048576}'))")")
done
scenario_note="ours = the incremental, ref = a full nbdcopy of s2 (nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}')); $bk_written of $(($(stat -c %s "$bk/origin.img") / 65536)) 64 KiB clusters written (4 KiB each) between s1 and s2, origin in $work"
