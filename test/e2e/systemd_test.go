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
	for link, target := range map[string]string{
		"nbdsnap@data.service":                  "nbdsnap@.service",
		"nbdsnap-snapshot@data-nightly.service": "nbdsnap-snapshot@.service",
	} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("systemd-analyze", "verify", "--man=no",
		filepath.Join(dir, "nbdsnap@data.service"),
		filepath.Join(dir, "nbdsnap-snapshot@data-nightly.service"),
		filepath.Join(dir, "nbdsnap.target"))
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
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
