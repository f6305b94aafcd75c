// Package vm tests nbdsnap end to end with the Linux kernel's own NBD client.
//
// The host kernel has no NBD driver, so TestVM boots a small virtual machine
// under QEMU's TCG emulator (`-accel tcg -cpu max`; the host's /dev/kvm
// cannot boot a stock kernel) and runs each scenario inside it:
//
//   - the kernel is Debian's linux-image-6.1.*-amd64, fetched with
//     `apt-get download` (never installed on the host), unpacked with
//     `dpkg-deb -x`; the uncompressed vmlinux is extracted from the bzImage,
//     because under TCG it boots seconds faster (QEMU enters it through its
//     PVH note). nbd.ko and ext4.ko (and for TestPowerLoss virtio_blk and
//     dm-log-writes) with their dependencies come from the same package,
//     in the order `modprobe --show-depends` gives. All of this is cached
//     under $NBDSNAP_VM_CACHE, else the user's cache directory
//     ($XDG_CACHE_HOME or ~/.cache)/nbdsnap-vm, keyed by package name and
//     version, so only the first run pays for it.
//   - the initramfs is written by the test itself (cpio "newc"): busybox
//     from busybox-static, the e2fsprogs, nbd-client, dmsetup and wipefs
//     binaries and nbdkit with the shared libraries `ldd` names, a static nbdsnap and the guest
//     agent (test/vm/guest), both built with CGO_ENABLED=0.
//   - QEMU runs with `-nodefaults -nic none`: the guest has no network
//     device; the daemon and nbd-client talk over a unix socket inside it
//     (the tls scenario: over TCP on the loopback interface).
//     The scenarios to run are named on the kernel command line; the guest
//     agent runs them in order, reports each result as one line on the
//     serial console, which the test captures, and stops at the first
//     failure; the test then boots again for the scenarios after it. A
//     failing scenario fails its subtest and logs its part of the console.
//
// $NBDSNAP_VM_LOGS, if set, names a directory where each boot's console is
// kept (named after the boot's first scenario), passed or not.
//
// The scenarios themselves live in the guest agent, which has a doc comment
// of its own. The "reference" scenario runs the same client path against
// nbdkit, so a broken harness is told apart from a broken nbdsnap.
//
// TestPowerLoss boots once more, with three virtio disks per recording
// (data, dm-log-writes log, record), records there and replays on the host;
// see powerloss_test.go and docs/design/2026-11-24-powerloss.md.
//
// Everything needed is installed by test/setup.sh; outside `make test` the
// test skips, naming what is missing (internal/testenv).
package vm
