# nbdsnap — see README.md. `make test` is what CI runs.
GO       ?= go
PREFIX   ?= /usr/local
FUZZTIME ?= 10s
# Pinned: a newer staticcheck may find new things, which should be a
# deliberate change, not a surprise in CI.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.6.1

.PHONY: all build deps test unit fuzz-smoke crashtest demo bench bench-engine install clean

all: build

# The version nbdsnap reports (version, --version, the daemon's status),
# stamped into cmd/nbdsnap's version variable. Without git (a source
# tarball) it stays empty and the binary falls back to the module version
# the go command records, then "devel".
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null)

# The binary build writes and install installs. Tests that run make set it
# to a file of their own, so that two test packages running at once do not
# rebuild the same file under each other.
BIN ?= bin/nbdsnap

# cgo off: the daemon sets PR_SET_IO_FLUSHER on every thread with
# syscall.AllThreadsSyscall, which Go refuses in a cgo binary.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/nbdsnap

# Installs the Debian packages and Go modules the tests and the demo use.
deps:
	./test/setup.sh

# Everything: formatting, vet, staticcheck, a tidy go.mod, unit + interop +
# end-to-end tests under the race detector, then a short run of every fuzz
# target. NBDSNAP_REQUIRE_TOOLS turns "tool missing, skipping" into a
# failure: after `deps` nothing skips.
test: deps build
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	$(GO) mod tidy -diff
	NBDSNAP_REQUIRE_TOOLS=1 $(GO) test -race -count=1 -timeout 30m ./...
	FUZZTIME=$(FUZZTIME) ./test/fuzz-smoke.sh

# Unit tests only, no external tools required.
unit:
	$(GO) test -race -count=1 -short ./...

fuzz-smoke:
	FUZZTIME=$(FUZZTIME) ./test/fuzz-smoke.sh

# The power-loss test in full: every FLUSH/FUA entry of each recording's
# log, or a seeded sample of 200 where there are more (make test checks 25
# per recording). About 2 minutes here; see test/vm/README.md.
crashtest: deps build
	NBDSNAP_REQUIRE_TOOLS=1 NBDSNAP_POWERLOSS_POINTS=$${NBDSNAP_POWERLOSS_POINTS:-200} \
		$(GO) test -count=1 -v -timeout 60m -run 'TestPowerLoss' ./test/vm/

demo: deps build
	./test/demo.sh

# Benchmarks against peers (nbdkit, qemu-storage-daemon); not part of `make test`.
bench: deps build
	./test/bench/run.sh

# The copy-on-write engine alone (Go benchmarks on /dev/shm), with the CPU
# floor of a first write; not part of `make test`.
bench-engine:
	./test/bench/engine.sh

# Units go where systemd looks for a package's units: for PREFIX=/usr,
# Debian 12's /lib/systemd/system (what `pkg-config --variable=
# systemdsystemunitdir systemd` says there); otherwise PREFIX/lib/systemd/
# system, which systemd also searches for /usr/local. /etc/systemd/system is
# the admin's, for drop-ins. The units name /usr/local/bin/nbdsnap; install
# rewrites that to the binary of this PREFIX. Man pages are section 8 (what
# `nbdsnap man` writes: system administration), as the units' Documentation=
# names them; completions go where bash-completion, zsh and fish look for a
# package's.
SYSTEMDUNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/nbdsnap
	install -d $(DESTDIR)$(SYSTEMDUNITDIR)
	for u in systemd/*.service systemd/*.target; do \
		sed 's|/usr/local/bin/nbdsnap|$(PREFIX)/bin/nbdsnap|g' $$u > $(DESTDIR)$(SYSTEMDUNITDIR)/$${u#systemd/} && \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$${u#systemd/} || exit 1; \
	done
	install -d $(DESTDIR)$(PREFIX)/share/man/man8
	man=$$(mktemp -d) && $(BIN) man --dir $$man >/dev/null && \
		install -m 0644 $$man/*.8 $(DESTDIR)$(PREFIX)/share/man/man8/; rc=$$?; rm -rf $$man; exit $$rc
	install -d $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	$(BIN) completion bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/nbdsnap
	$(BIN) completion zsh > $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_nbdsnap
	$(BIN) completion fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/nbdsnap.fish
	chmod 0644 $(DESTDIR)$(PREFIX)/share/bash-completion/completions/nbdsnap \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_nbdsnap \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/nbdsnap.fish

# A .deb of `make install PREFIX=/usr`, built with dpkg-deb alone (see
# packaging/deb/build.sh), into DEBOUT; lintian checks it in test/deb.
DEBOUT ?= bin
.PHONY: deb
deb:
	VERSION='$(VERSION)' MAKE='$(MAKE)' ./packaging/deb/build.sh '$(DEBOUT)'

clean:
	rm -rf bin
