package internal_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestForbiddenImports keeps the import graph flowing one way:
// cli → control, daemon → nbdsrv, cow → backstore → vfs.
// nbdsrv knows nothing of snapshots; the storage layers know nothing of the
// network, the daemon or the CLI.
func TestForbiddenImports(t *testing.T) {
	const mod = "github.com/nbdsnap/nbdsnap/internal/"
	forbidden := map[string][]string{
		"nbdsrv":    {"cow", "backstore", "vfs", "daemon", "control", "cli"},
		"vfs":       {"nbdsrv", "cow", "backstore", "daemon", "control", "cli"},
		"backstore": {"nbdsrv", "cow", "daemon", "control", "cli"},
		"cow":       {"nbdsrv", "daemon", "control", "cli"},
		"control":   {"daemon", "cli"},
		"daemon":    {"cli"},
	}
	// Only the daemon knows of Prometheus: the engine and the server
	// report through Info and Config.Observe.
	const prom = "github.com/prometheus/"
	for pkg, bad := range forbidden {
		out, err := exec.Command("go", "list", "-deps", "./"+pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps ./%s: %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if pkg != "daemon" && strings.HasPrefix(dep, prom) {
				t.Errorf("internal/%s imports %s, which it must not", pkg, dep)
			}
			for _, b := range bad {
				if dep == mod+b || strings.HasPrefix(dep, mod+b+"/") {
					t.Errorf("internal/%s imports %s, which it must not", pkg, dep)
				}
			}
		}
	}
}
