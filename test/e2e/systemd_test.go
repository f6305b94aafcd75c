package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestSystemdVerify runs systemd-analyze verify on the shipped units.
// verify insists that ExecStart binaries exist, so it checks copies whose
// /usr/local/bin/nbdsnap points at the binary under test; instances
// (nbdsnap@data, nbdsnap-snapshot@data-nightly) are verified through
// symlinks to the templates. A warning counts as a failure.
func TestSystemdVerify(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "systemd-analyze")
	_, self, _, _ := runtime.Caller(0)
	src := filepath.Join(filepath.Dir(self), "..", "..", "systemd")
	dir := t.TempDir()
	for _, u := range []string{"nbdsnap@.service", "nbdsnap-snapshot@.service", "nbdsnap.target"} {
		b, err := os.ReadFile(filepath.Join(src, u))
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(u, ".service") && !strings.Contains(string(b), "/usr/local/bin/nbdsnap") {
			t.Fatalf("%s does not run /usr/local/bin/nbdsnap (where make install puts it)", u)
		}
		b = []byte(strings.ReplaceAll(string(b), "/usr/local/bin/nbdsnap", nbdsnapBin))
		if err := os.WriteFile(filepath.Join(dir, u), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verifyUnits(t, dir, "")
}

// TestUnitStopTimeout: nbdsnap@.service gives the daemon a --stop-timeout
// that systemd's TimeoutStopSec exceeds by a margin (the daemon may take a
// second past it, and a SIGKILL before it is done leaves the writes that
// waited for a store unanswered), and counts exit 3, a stop forced at the
// timeout, as a stop.
func TestUnitStopTimeout(t *testing.T) {
	_, self, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(self), "..", "..", "systemd", "nbdsnap@.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	m := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/nbdsnap serve .* --stop-timeout (\S+) \$NBDSNAP_OPTS$`).FindStringSubmatch(unit)
	if m == nil {
		t.Fatal("ExecStart does not pass --stop-timeout before $NBDSNAP_OPTS (where a user's own wins)")
	}
	stop, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatalf("--stop-timeout %q: %v", m[1], err)
	}
	m = regexp.MustCompile(`(?m)^TimeoutStopSec=(\d+)$`).FindStringSubmatch(unit)
	if m == nil {
		t.Fatal("no TimeoutStopSec=SECONDS")
	}
	sec, _ := strconv.Atoi(m[1])
	if systemd := time.Duration(sec) * time.Second; systemd < stop+5*time.Second {
		t.Fatalf("TimeoutStopSec=%v leaves --stop-timeout %v less than 5s of margin", systemd, stop)
	}
	if !regexp.MustCompile(`(?m)^SuccessExitStatus=(.* )?3( .*)?$`).MatchString(unit) {
		t.Fatal("SuccessExitStatus does not list 3 (stop forced at --stop-timeout)")
	}
}

// Exposure levels `systemd-analyze security` gives the installed units
// (0 is best, 10 worst; both were 9.6 before they were sandboxed). A
// change that raises one is a change to the sandbox, to make on purpose
// here.
const (
	maxExposureDaemon   = 2.0
	maxExposureSnapshot = 2.0
)

// TestInstall runs `make install DESTDIR=tmp PREFIX=/usr` as a package
// build would, then checks what it put where: the units name the binary of
// that PREFIX, and pass `systemd-analyze verify` with its man check (each
// Documentation= man page must be among the installed ones, found through
// MANPATH); their sandbox does not score worse than above in
// `systemd-analyze security --offline=yes --root=tmp` (offline analysis:
// no systemd needs to run here).
func TestInstall(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "make")
	testenv.RequireTool(t, "systemd-analyze")
	testenv.RequireTool(t, "man")
	_, self, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(self), "..", "..")
	dest := t.TempDir()
	// BIN: a binary of this test's own, not bin/nbdsnap, which test/deb
	// may be building at the same time.
	run(t, "make", "-C", root, "install", "DESTDIR="+dest, "PREFIX=/usr", "BIN="+filepath.Join(t.TempDir(), "nbdsnap"))

	units := filepath.Join(dest, "lib", "systemd", "system")
	for _, f := range []string{
		"usr/bin/nbdsnap",
		"lib/systemd/system/nbdsnap@.service",
		"lib/systemd/system/nbdsnap-snapshot@.service",
		"lib/systemd/system/nbdsnap.target",
		"usr/share/man/man8/nbdsnap.8",
		"usr/share/man/man8/nbdsnap-serve.8",
		"usr/share/man/man8/nbdsnap-create.8",
		"usr/share/bash-completion/completions/nbdsnap",
		"usr/share/zsh/vendor-completions/_nbdsnap",
		"usr/share/fish/vendor_completions.d/nbdsnap.fish",
	} {
		if fi, err := os.Stat(filepath.Join(dest, f)); err != nil || fi.Size() == 0 {
			t.Errorf("make install: %s missing or empty (%v)", f, err)
		}
	}

	// verify insists that ExecStart binaries exist: check copies that run
	// the installed binary where the system's would be.
	dir := t.TempDir()
	for _, u := range []string{"nbdsnap@.service", "nbdsnap-snapshot@.service", "nbdsnap.target"} {
		b, err := os.ReadFile(filepath.Join(units, u))
		if err != nil {
			t.Fatal(err)
		}
		unit := string(b)
		if strings.Contains(unit, "/usr/local/") {
			t.Errorf("installed %s still names /usr/local with PREFIX=/usr", u)
		}
		if strings.HasSuffix(u, ".service") && !strings.Contains(unit, "/usr/bin/nbdsnap ") {
			t.Errorf("installed %s does not run /usr/bin/nbdsnap", u)
		}
		unit = strings.ReplaceAll(unit, "/usr/bin/nbdsnap ", filepath.Join(dest, "usr", "bin", "nbdsnap")+" ")
		if err := os.WriteFile(filepath.Join(dir, u), []byte(unit), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verifyUnits(t, dir, filepath.Join(dest, "usr", "share", "man"))

	for unit, limit := range map[string]float64{
		"nbdsnap@data.service":                  maxExposureDaemon,
		"nbdsnap-snapshot@data-nightly.service": maxExposureSnapshot,
	} {
		out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "--root="+dest, "--no-pager", unit).CombinedOutput()
		if err != nil {
			t.Errorf("systemd-analyze security %s: %v\n%s", unit, err, out)
			continue
		}
		m := regexp.MustCompile(`Overall exposure level for \S+: (\d+\.\d+)`).FindSubmatch(out)
		if m == nil {
			t.Errorf("systemd-analyze security %s: no overall exposure level in\n%s", unit, out)
			continue
		}
		level, _ := strconv.ParseFloat(string(m[1]), 64)
		if level > limit {
			t.Errorf("%s: exposure level %.1f, worse than %.1f:\n%s", unit, level, limit, out)
		}
	}
}

// verifyUnits runs systemd-analyze verify on the units in dir, instantiated
// as the README's examples name them. With manpath it also checks that the
// man pages the units' Documentation= names are there; without, it skips
// that check.
func verifyUnits(t *testing.T, dir, manpath string) {
	t.Helper()
	for link, target := range map[string]string{
		"nbdsnap@data.service":                  "nbdsnap@.service",
		"nbdsnap-snapshot@data-nightly.service": "nbdsnap-snapshot@.service",
	} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	man := "--man=no"
	if manpath != "" {
		man = "--man=yes"
	}
	cmd := exec.Command("systemd-analyze", "verify", man,
		filepath.Join(dir, "nbdsnap@data.service"),
		filepath.Join(dir, "nbdsnap-snapshot@data-nightly.service"),
		filepath.Join(dir, "nbdsnap.target"))
	if manpath != "" {
		cmd.Env = append(os.Environ(), "MANPATH="+manpath)
	}
	if out, err := cmd.CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", man, err, out)
	}
}
