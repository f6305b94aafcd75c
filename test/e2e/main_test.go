package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/stallfs"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// nbdsnapBin is the binary under test, built once by TestMain (or named by
// NBDSNAP_E2E_BIN). It is the only package-level variable: every test reads
// it, none writes it.
var nbdsnapBin string

func TestMain(m *testing.M) {
	stallfs.ServeIfAsked() // the FUSE server of stallfs.Mount runs in this binary
	flag.Parse()
	if testing.Short() {
		// make unit: no binary, no external tools; every test skips.
		os.Exit(m.Run())
	}
	if bin := os.Getenv("NBDSNAP_E2E_BIN"); bin != "" {
		// A binary built elsewhere, say from an older commit, to show
		// which of these tests it fails.
		nbdsnapBin = bin
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "nbdsnap-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	nbdsnapBin = filepath.Join(dir, "nbdsnap")
	build := exec.Command("go", "build", "-o", nbdsnapBin, "github.com/nbdsnap/nbdsnap/cmd/nbdsnap")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build nbdsnap:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// e2e skips the calling test under -short (make unit), where TestMain
// builds no binary.
func e2e(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: skipped with -short")
	}
}

// daemon is one `nbdsnap serve` process.
type daemon struct {
	t                             *testing.T
	dir, origin, sock, ctl, state string
	cmd                           *exec.Cmd
	log                           *testenv.SyncBuffer
	done                          chan struct{}
	waitErr                       error
}

// startDaemon serves origin as export "data" with sockets and state under
// dir, and waits until its control socket answers.
func startDaemon(t *testing.T, dir, origin string, extra ...string) *daemon {
	t.Helper()
	return startDaemonAt(t, dir, origin, "data", filepath.Join(dir, "data.sock"), filepath.Join(dir, "data.ctl"), extra...)
}

// startDaemonAt is startDaemon with the daemon's name and sockets chosen.
func startDaemonAt(t *testing.T, dir, origin, name, sock, ctl string, extra ...string) *daemon {
	t.Helper()
	d := newDaemon(t, dir, origin, sock, ctl, filepath.Join(dir, "state"))
	d.spawn(name, append([]string{"--state-dir", d.state}, extra...)...)
	d.waitReady(10 * time.Second)
	return d
}

// spawnDaemon is startDaemon without the wait: for a daemon that waits
// before it serves (waitReady waits for it).
func spawnDaemon(t *testing.T, dir, origin string, extra ...string) *daemon {
	t.Helper()
	d := newDaemon(t, dir, origin, filepath.Join(dir, "data.sock"), filepath.Join(dir, "data.ctl"), filepath.Join(dir, "state"))
	d.spawn("data", append([]string{"--state-dir", d.state}, extra...)...)
	return d
}

// newDaemon describes a daemon to be started with spawn; state is where it
// is expected to keep its records.
func newDaemon(t *testing.T, dir, origin, sock, ctl, state string) *daemon {
	return &daemon{t: t, dir: dir, origin: origin, sock: sock, ctl: ctl, state: state,
		log: &testenv.SyncBuffer{}, done: make(chan struct{})}
}

// spawn runs `nbdsnap serve ORIGIN --name NAME --listen unix:SOCK --control
// CTL ARGS...` and returns at once; the daemon is stopped at cleanup, and
// its log shown if the test failed.
func (d *daemon) spawn(name string, args ...string) {
	d.t.Helper()
	args = append([]string{"serve", d.origin, "--name", name, "--listen", "unix:" + d.sock, "--control", d.ctl}, args...)
	d.cmd = exec.Command(nbdsnapBin, args...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	go func() { d.waitErr = d.cmd.Wait(); close(d.done) }()
	d.t.Cleanup(func() {
		d.stop()
		if d.t.Failed() {
			d.t.Logf("daemon log:\n%s", d.log.String())
		}
	})
}

// waitReady waits up to timeout until the daemon's control socket answers
// a status request (a starting daemon answers "unavailable" meanwhile).
func (d *daemon) waitReady(timeout time.Duration) {
	d.t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		if _, err := control.NewClient(d.ctl).Status(context.Background()); err == nil {
			return
		}
		select {
		case <-d.done:
			d.t.Fatalf("daemon exited during startup: %v\n%s", d.waitErr, d.log.String())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("daemon not ready after %v\n%s", timeout, d.log.String())
		}
	}
}

// stop sends SIGTERM and returns the exit error (nil for exit 0).
func (d *daemon) stop() error {
	select {
	case <-d.done:
		return d.waitErr
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		d.t.Errorf("daemon ignored SIGTERM for 30s")
	}
	return d.waitErr
}

// kill9 kills the daemon the hard way and waits for it to be gone.
func (d *daemon) kill9() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

func (d *daemon) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + d.sock
}

func (d *daemon) status(t *testing.T) control.Status {
	t.Helper()
	out, errs, code := cli(t, "status", "--json", "--control", d.ctl)
	if code != 0 {
		t.Fatalf("status --json: exit %d: %s", code, errs)
	}
	var st control.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, out)
	}
	return st
}

// cli runs the nbdsnap binary and returns its output and exit code.
func cli(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(nbdsnapBin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("run nbdsnap %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// mustCLI runs the binary and fails the test unless it exits 0.
func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := cli(t, args...)
	if code != 0 {
		t.Fatalf("nbdsnap %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	return out
}

// run runs an external tool and fails the test on a non-zero exit.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// readExport copies a whole export into memory with nbdcopy.
func readExport(t *testing.T, uri string) []byte {
	t.Helper()
	testenv.RequireTool(t, "nbdcopy")
	cmd := exec.Command("nbdcopy", uri, "-")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("nbdcopy %s -: %v: %s", uri, err, errb.String())
	}
	return out.Bytes()
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// randomFile writes size random bytes to path and returns them.
func randomFile(t *testing.T, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}
