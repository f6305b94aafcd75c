package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

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
