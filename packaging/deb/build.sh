#!/usr/bin/env bash
# Builds OUTDIR/nbdsnap_VERSION_ARCH.deb from `make install DESTDIR=STAGING
# PREFIX=/usr`, with dpkg-deb alone: the package ships one static Go binary,
# so a debian/ source tree and dpkg-buildpackage (and their build-deps) would
# add nothing but weight. Run it through `make deb`, which passes VERSION
# (the git describe that make build stamps into the binary).
set -euo pipefail
umask 022
cd "$(dirname "$0")/../.."
here=packaging/deb
out=${1:?usage: build.sh OUTDIR}
: "${VERSION:?VERSION is empty (no git?): give one, make deb VERSION=v1.2.3}"
make=${MAKE:-make}

# Debian's version from git describe: no leading v, and no '-' (in a Debian
# version a hyphen starts the Debian revision): v1.2.3-4-gabcdef-dirty gives
# 1.2.3+4+gabcdef+dirty, which sorts after 1.2.3 and before 1.2.4. A tree
# with no tag describes itself as a bare hash; 0~git<hash> sorts it below
# any release, and a version must start with a digit, which a hash need not.
# The Debian revision -1 marks the packaging as a layer over the upstream
# version (hence changelog.Debian.gz, which a native version would not have).
upstream=${VERSION#v}
case $upstream in *.*) ;; *) upstream=0~git$upstream ;; esac
deb_version=${upstream//-/+}-1
dpkg --validate-version "$deb_version"
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>')}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
"$make" --no-print-directory install DESTDIR="$root" PREFIX=/usr VERSION="$VERSION"

# What dh_compress would do: man pages compressed, reproducibly (-n: no
# name or time stamp in the header).
[ -d "$root/usr/share/man" ] || { echo "build.sh: make install installed no man pages" >&2; exit 1; }
find "$root/usr/share/man" -type f ! -name '*.gz' -exec gzip -9n {} +

# The units must run the binary this package installs, wherever make
# install put both: a unit pointing elsewhere fails only at its first start.
units=$(find "$root" -path '*/systemd/system/*' -type f)
[ -n "$units" ] || { echo "build.sh: make install installed no systemd units" >&2; exit 1; }
for bin in $(grep -oh '/[[:alnum:]/_.-]*bin/nbdsnap\b' $units | sort -u); do
	[ -x "$root$bin" ] || { echo "build.sh: a unit runs $bin, which the package does not install" >&2; exit 1; }
done

# nbdsnap@NAME reads /etc/nbdsnap/NAME.conf; the directory is the package's,
# the files in it are the admin's (one per origin, none by default, so no
# conffiles).
install -d -m 0755 "$root/etc/nbdsnap"

doc=$root/usr/share/doc/nbdsnap
# The years of the copyright notice are those of the commits.
years=$(git log --format=%ad --date=format:%Y | sort -u | sed -n '1p;$p' | uniq | paste -sd-)
install -d "$doc"
sed "s/@YEARS@/$years/" "$here/copyright" >"$doc/copyright"
cat >"$tmp/changelog.Debian" <<END
nbdsnap ($deb_version) unstable; urgency=medium

  * Built from git $VERSION with make deb.

 -- $maintainer  $(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
END
gzip -9n <"$tmp/changelog.Debian" >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/nbdsnap"

# What dh_strip would do: the symbol table and DWARF go (a Go binary keeps
# its own tables for stack traces); the version stamp is data and stays.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/nbdsnap"

# make install leaves modes to install(1); make them what Debian expects.
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f -exec chmod 0644 {} +
chmod 0755 "$root/usr/bin/nbdsnap"

mkdir -m 0755 "$root/DEBIAN"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
install -m 0755 "$here/postinst" "$here/postrm" "$root/DEBIAN/"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
# Depends: none. The binary is static (CGO_ENABLED=0), so there are no
# shared libraries to depend on; the one program the daemon runs, wipefs,
# is util-linux's, which is Essential. Recommends nbd-client: the snapshot
# unit attaches with it, and it is how a local mount reaches the export.
# Suggests libnbd-bin: nbdcopy and nbdinfo read snapshots (backups).
cat >"$root/DEBIAN/control" <<END
Package: nbdsnap
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Recommends: nbd-client
Suggests: libnbd-bin
Section: admin
Priority: optional
Description: userspace block-device snapshots served over NBD
 nbdsnap owns an origin (a block device or a file) and serves it as a
 read-write NBD export. A snapshot copies each cluster of the origin to a
 backing store before it is first overwritten, and is served as a
 read-only NBD export of the frozen image; persistent snapshots survive a
 daemon restart.
 .
 The package ships the daemon and client (nbdsnap), the systemd units
 nbdsnap@.service, nbdsnap-snapshot@.service and nbdsnap.target (none
 enabled), man pages and shell completions.
END

mkdir -p "$out"
deb=$out/nbdsnap_${deb_version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
