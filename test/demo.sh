#!/usr/bin/env bash
# The nbdsnap demo (make demo): serve a sparse-file origin, write through the
# proxy with a real NBD client, take a snapshot, write more, and prove with
# checksums that the snapshot still holds the data of the create instant.
# Then an incremental backup: a full copy of the first snapshot, a second
# one, `nbdsnap diff`, only the changed ranges copied with dd (through
# nbdfuse; without FUSE, with nbdsh), and cmp proving the copy equals the
# second snapshot.
# Needs no root: everything lives in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/bin/nbdsnap
[ -x "$bin" ] || { echo "demo: $bin missing; run make build" >&2; exit 1; }
for tool in nbdcopy nbdinfo qemu-io jq cmp; do
	command -v "$tool" >/dev/null || { echo "demo: $tool missing; run make deps" >&2; exit 1; }
done

work=$(mktemp -d /tmp/nbdsnap-demo.XXXXXX)
pid=""
cleanup() {
	fusermount3 -u "$work/mnt" 2>/dev/null || true
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }
run() {
	printf '$'
	printf ' %q' "${@/#$PWD\//}"
	printf '\n'
	"$@"
}
sock=$work/demo.sock
ctl=$work/demo.ctl
uri() { echo "nbd+unix:///$1?socket=$sock"; }
sum() { nbdcopy "$(uri "$1")" - | sha256sum | cut -d' ' -f1; }

say "a 256 MiB sparse origin, served as NBD export 'demo'"
run truncate -s 256M "$work/origin.img"
printf '$ nbdsnap serve origin.img --name demo ... &\n'
"$bin" serve "$work/origin.img" --name demo --listen "unix:$sock" --control "$ctl" \
	--state-dir "$work/state" --log-level warn &
pid=$!
for _ in $(seq 100); do
	"$bin" status --control "$ctl" >/dev/null 2>&1 && break
	kill -0 "$pid" 2>/dev/null || { echo "demo: daemon exited" >&2; exit 1; }
	sleep 0.1
done
run "$bin" status --control "$ctl"

say "write 32 MiB of random data through the proxy with nbdcopy, and a pattern with qemu-io"
head -c 32M /dev/urandom >"$work/random.bin"
run nbdcopy "$work/random.bin" "$(uri demo)"
run qemu-io -f raw -c 'write -q -P 0x5a 200M 8M' "$(uri demo)"
before=$(sum demo)
echo "origin sha256 before the snapshot: $before"

say "take snapshot 'snap1'"
run "$bin" create snap1 --control "$ctl" --backing "$work/snap1.cow" --cluster-size 64K

say "overwrite parts of the origin after the snapshot"
run qemu-io -f raw -c 'write -q -P 0xee 0 8M' -c 'write -q -P 0xdd 100M 4M' -c 'discard -q 200M 4M' "$(uri demo)"
after=$(sum demo)
snap=$(sum snap1)
echo "origin   sha256 now: $after"
echo "snapshot sha256 now: $snap"
if [ "$after" = "$before" ]; then
	echo "demo: FAIL: the origin did not change" >&2
	exit 1
fi
if [ "$snap" != "$before" ]; then
	echo "demo: FAIL: the snapshot differs from the origin at the create instant" >&2
	exit 1
fi
echo "OK: the snapshot still holds exactly the data of the create instant"
run qemu-io -f raw -r -c 'read -q -P 0x5a 200M 8M' "$(uri snap1)"
echo "OK: the pattern discarded on the origin still reads back from the snapshot"

say "incremental backup: a full backup of snap1, then only what changed until snap2"
run nbdcopy "$(uri snap1)" "$work/full.img"
run "$bin" create snap2 --control "$ctl" --backing "$work/snap2.cow"
run "$bin" diff snap1 snap2 --control "$ctl"
echo "the same blocks, as NBD clients see them (context qemu:dirty-bitmap:snap1 of export snap2):"
run nbdinfo --map=qemu:dirty-bitmap:snap1 "$(uri snap2)"
ranges=$("$bin" diff snap1 snap2 --control "$ctl" --json | jq -r '.ranges[] | "\(.offset) \(.length)"')
if command -v nbdfuse >/dev/null && { exec 3<>/dev/fuse; } 2>/dev/null; then
	exec 3>&-
	echo "copy each changed range of snap2 (mounted with nbdfuse) into the full backup with dd:"
	mkdir "$work/mnt"
	printf '$ nbdfuse -r mnt/disk %q &\n' "$(uri snap2)"
	nbdfuse -r -P "$work/nbdfuse.pid" "$work/mnt/disk" "$(uri snap2)" &
	fuse=$!
	for _ in $(seq 100); do [ -s "$work/nbdfuse.pid" ] && break; sleep 0.1; done
	while read -r off len; do
		run dd if="$work/mnt/disk" of="$work/full.img" bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
			conv=notrunc skip="$off" seek="$off" count="$len" status=none
	done <<<"$ranges"
	run fusermount3 -u "$work/mnt"
	wait "$fuse"
else
	echo "no FUSE here (/dev/fuse): copy each changed range of snap2 into the full backup with nbdsh (libnbd) instead"
	printf '$ RANGES=... FULL=full.img nbdsh -u %q -c ...\n' "$(uri snap2)"
	# nbdsh runs the python3 first on PATH: Debian's has python3-libnbd.
	RANGES=$ranges FULL=$work/full.img PATH=/usr/bin:$PATH nbdsh -u "$(uri snap2)" -c '
import os
fd = os.open(os.environ["FULL"], os.O_WRONLY)
for line in os.environ["RANGES"].splitlines():
    off, n = map(int, line.split())
    os.pwrite(fd, h.pread(n, off), off)
os.close(fd)'
fi
copied=$(awk '{n += $2} END {print n + 0}' <<<"$ranges")
run nbdcopy "$(uri snap2)" "$work/snap2.img"
run cmp "$work/full.img" "$work/snap2.img"
echo "OK: the full backup of snap1 plus the $((copied >> 20)) MiB that changed equals snap2 ($(($(stat -c %s "$work/snap2.img") >> 20)) MiB)"

say "status"
run "$bin" status --control "$ctl"
run "$bin" status snap2 --control "$ctl" --json

say "clear the snapshots and stop the daemon (SIGTERM)"
run "$bin" clear snap2 --control "$ctl"
run "$bin" clear snap1 --control "$ctl"
kill -TERM "$pid"
wait "$pid"
pid=""
for s in snap1 snap2; do
	[ ! -e "$work/$s.cow" ] || { echo "demo: FAIL: backing store of $s left behind" >&2; exit 1; }
done
echo
echo "demo: OK"
