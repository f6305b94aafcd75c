// Package testenv decides, in one place, what a test does when the machine
// lacks something it needs: outside CI it skips loudly, naming what is
// missing; under `make test` (NBDSNAP_REQUIRE_TOOLS=1) or in CI (CI=true)
// it fails, because there the project's setup has installed everything.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// Strict reports whether missing tools are failures rather than skips.
func Strict() bool {
	return os.Getenv("NBDSNAP_REQUIRE_TOOLS") == "1" || os.Getenv("CI") == "true"
}

// RequireTool returns the path of an executable, or skips (fails when
// strict) if it is not installed.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, name+" is not installed (make deps installs it)")
	}
	return p
}

// RequireRoot skips (fails when strict) unless the test runs as root, which
// FUSE and loop mounts need.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "needs root (FUSE and loop mounts)")
	}
}

func missing(t testing.TB, why string) {
	t.Helper()
	if Strict() {
		t.Fatalf("%s", why)
	}
	t.Skipf("SKIP: %s", why)
}

// ProcStatus returns a "kB" field of /proc/PID/status (VmRSS, VmHWM...) in
// bytes: what tests that measure a server process's memory read.
func ProcStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
