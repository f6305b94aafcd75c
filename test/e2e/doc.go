// Package e2e holds the end-to-end tests of nbdsnap: they build the real
// binary, start real daemon processes, and judge them with real NBD clients
// (nbdcopy, nbdinfo, qemu-io, qemu-img, libnbd from Python, nbdfuse + loop +
// ext4; over TLS with certificates made by openssl) and with
// systemd-analyze. They need the tools test/setup.sh installs and, for the
// mount tests, root; without them they skip loudly, under `make test` they
// fail (see internal/testenv).
package e2e
