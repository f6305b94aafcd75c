#!/usr/bin/env bash
# The nbdsnap demo (make demo): serve a sparse-file origin, write through the
# proxy with a real NBD client, take a snapshot, write more, and prove with
# checksums that the snapshot still holds the data of the create instant.
# Needs no root: everything lives in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/bin/nbdsnap
[ -x "$bin" ] || { echo "demo: $bin missing; run make build" >&2; exit 1; }
for tool in nbdcopy qemu-io; do
	command -v "$tool" >/dev/null || { echo "demo: $tool missing; run make deps" >&2; exit 1; }
done

work=$(mktemp -d /tmp/nbdsnap-demo.XXXXXX)
pid=""
cleanup() {
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

say "status"
run "$bin" status --control "$ctl"
run "$bin" status snap1 --control "$ctl" --json

say "clear the snapshot and stop the daemon (SIGTERM)"
run "$bin" clear snap1 --control "$ctl"
kill -TERM "$pid"
wait "$pid"
pid=""
[ ! -e "$work/snap1.cow" ] || { echo "demo: FAIL: backing store left behind" >&2; exit 1; }
echo
echo "demo: OK"
