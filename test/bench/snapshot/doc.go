// Package snapshot holds the side-by-side snapshot benchmark of `make bench`
// nbdsnap against nbdkit and QEMU image fleecing
// (qemu-storage-daemon with a copy-before-write filter and a snapshot-access
// export), all driven by fio --ioengine=nbd.
//
//   - benchsnap/ is the driver: it starts each server on the same files,
//     runs the scenarios, and writes a markdown table, a PNG chart and the raw
//     samples to a results directory;
//   - nbdsnap-pprof/ is the nbdsnap CLI with a net/http/pprof listener, for
//     profiling the daemon under these workloads without touching its code;
//   - smoke_test.go runs the driver with tiny sizes in `make test`, so the
//     harness cannot rot, and the held-writes rows (scenarios.d/heldwrites.sh)
//     the same way.
//
// test/bench/scenarios.d/snapshot.sh hooks the driver into test/bench/run.sh.
package snapshot
