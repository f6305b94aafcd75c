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

# cgo off: the daemon sets PR_SET_IO_FLUSHER on every thread with
# syscall.AllThreadsSyscall, which Go refuses in a cgo binary.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o bin/nbdsnap ./cmd/nbdsnap

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

install: build
	install -D -m 0755 bin/nbdsnap $(DESTDIR)$(PREFIX)/bin/nbdsnap
	install -d $(DESTDIR)/etc/systemd/system
	install -m 0644 systemd/*.service systemd/*.target $(DESTDIR)/etc/systemd/system/

clean:
	rm -rf bin
