# shellcheck shell=bash
# Sourced by test/bench/run.sh after its built-in scenarios:
# nbdsnap (persistent and transient snapshots) side by side with nbdkit and
# QEMU image fleecing (qemu-storage-daemon, copy-before-write +
# snapshot-access), fio --ioengine=nbd, origin and stores in /dev/shm and on
# disk. The driver is test/bench/snapshot/benchsnap; it writes results.md,
# chart.png and raw.json to SNAP_OUT.
#
# Uses run.sh's RUNS, RUNTIME (0 = one pass per job, for the smoke test),
# SIZE and $work. Overrides: SNAP_OUT (default bench/results/DATE),
# SNAP_LOCATIONS (shm=/dev/shm,disk=/var/tmp), SNAP_PASS_SIZE (512M, bytes a
# first-write pass covers), SNAP_RESTART_CLUSTERS (1000000),
# SNAP_CREATE_SAMPLES (20), SNAP_NBDSNAP (bin/nbdsnap).
for tool in fio nbdkit qemu-storage-daemon nbdcopy gnuplot go; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (make deps)" >&2; exit 1; }
done
echo "bench: snapshot scenarios (nbdsnap vs nbdkit vs QEMU fleecing)" >&2
go build -o "$work/benchsnap" ./test/bench/snapshot/benchsnap
"$work/benchsnap" \
	-nbdsnap "${SNAP_NBDSNAP:-bin/nbdsnap}" \
	-runs "$RUNS" -runtime "$RUNTIME" -size "$SIZE" \
	-pass-size "${SNAP_PASS_SIZE:-512M}" \
	-locations "${SNAP_LOCATIONS:-shm=/dev/shm,disk=/var/tmp}" \
	-restart-clusters "${SNAP_RESTART_CLUSTERS:-1000000}" \
	-create-samples "${SNAP_CREATE_SAMPLES:-20}" \
	-out "${SNAP_OUT:-bench/results/$(date -u +%Y-%m-%dT%H%MZ)}"
