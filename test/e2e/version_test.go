package e2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// buildNbdsnap builds the binary into a test directory with extra go build
// arguments and returns its path.
func buildNbdsnap(t *testing.T, args ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nbdsnap")
	args = append(append([]string{"build", "-o", bin}, args...), "github.com/nbdsnap/nbdsnap/cmd/nbdsnap")
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return bin
}

// versions runs `BIN --version` and `BIN version`, requires the two to
// print the same, and returns it.
func versions(t *testing.T, bin string) string {
	t.Helper()
	flag, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatalf("--version: %v", err)
	}
	cmd, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatalf("version: %v", err)
	}
	if string(flag) != string(cmd) {
		t.Fatalf("--version prints %q, version prints %q", flag, cmd)
	}
	return string(flag)
}

// TestVersionStamped: the version make build stamps with -ldflags -X is
// what both version commands print and what the daemon reports in status,
// human and JSON; a build with no version known says "devel".
func TestVersionStamped(t *testing.T) {
	e2e(t)
	const stamp = "v9.8.7-3-gabcdef0-dirty"
	bin := buildNbdsnap(t, "-ldflags", "-X main.version="+stamp)
	if got := versions(t, bin); !strings.HasPrefix(got, "nbdsnap "+stamp+" (go") {
		t.Fatalf("stamped build prints %q", got)
	}
	if got := versions(t, buildNbdsnap(t, "-buildvcs=false")); !strings.HasPrefix(got, "nbdsnap devel (go") {
		t.Fatalf("build without a version prints %q", got)
	}

	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	ctl := filepath.Join(dir, "ver.ctl")
	d := exec.Command(bin, "serve", origin, "--name", "ver", "--listen", "unix:"+filepath.Join(dir, "ver.sock"),
		"--control", ctl, "--state-dir", filepath.Join(dir, "state"), "--log-level", "error")
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Process.Signal(syscall.SIGTERM)
		d.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := control.NewClient(ctl).Status(context.Background()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("daemon not ready after 10s")
		}
	}
	// The CLI of the test build asks the stamped daemon.
	if out := mustCLI(t, "status", "--control", ctl); !strings.Contains(out, ", version "+stamp+"\n") {
		t.Errorf("status does not show the daemon's version %s:\n%s", stamp, out)
	}
	var st control.Status
	if err := json.Unmarshal([]byte(mustCLI(t, "status", "--json", "--control", ctl)), &st); err != nil || st.Version != stamp {
		t.Errorf("status --json: version %q (%v), want %q", st.Version, err, stamp)
	}
	if out := mustCLI(t, "version", "--control", ctl); !strings.HasSuffix(out, "daemon at "+ctl+": nbdsnap "+stamp+"\n") {
		t.Errorf("version --control:\n%s", out)
	}
}
