#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need: Debian packages
# (only those missing, so a prepared machine does no network work) and the Go
# modules pinned in go.sum.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(
	libnbd-bin      # nbdinfo, nbdcopy, nbdfuse, nbdsh
	python3-libnbd  # nbdsh scripts
	nbdkit          # reference NBD server for interop and benchmarks
	qemu-utils      # qemu-io, qemu-img, qemu-nbd
	fio             # fio --ioengine=nbd
	fuse3           # nbdfuse
	e2fsprogs       # mkfs.ext4, e2fsck
	nbd-client      # the kernel client the systemd units call
	systemd         # systemd-analyze verify
	man-db          # man: systemd-analyze verify's check of the units' Documentation= pages
	util-linux      # mount, losetup, wipefs (the daemon checks backing devices with it)
	fdisk           # sfdisk: partition tables on loop devices in the lifecycle tests
	kmod            # modinfo for the VM tests
	qemu-system-x86     # test/vm: boots a Debian kernel that has the NBD driver (TCG)
	qemu-system-common  # test/vm: firmware and keymaps qemu-system-x86 loads
	busybox-static      # test/vm: the guest's userland in the initramfs
	dmsetup             # test/vm: dm-log-writes in the power-loss test's guest
	gnuplot-nox         # test/bench/snapshot: the PNG chart of make bench
	jq                  # test/bench/run.sh: reads fio's JSON
	bc                  # test/bench/run.sh: ratios
	diffutils           # cmp in the nbdsrv interop tests
	openssl             # certificates for the TLS tests and the TLS rows of make bench
	prometheus          # promtool: checks the /metrics output and contrib/prometheus rules
	lintian             # test/deb: checks the package make deb builds
	binutils            # strip, which make deb runs on the binary as dh_strip would
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
# The VM tests download Debian's kernel package at the version the package
# lists name, so lists not refreshed for a day are refreshed too. apt leaves
# unchanged list files untouched, hence a stamp of our own.
stamp=/var/cache/apt/nbdsnap-update-stamp
fresh=$(find "$stamp" /var/lib/apt/lists -maxdepth 1 \( -name nbdsnap-update-stamp -o -name '*_Packages*' \) -mtime -1 2>/dev/null | head -1 || true)
if ((${#missing[@]})) || [ -z "$fresh" ]; then
	$sudo apt-get update -qq
	$sudo touch "$stamp"
fi
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
go mod download
