package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestSdNotify: under a NOTIFY_SOCKET (what systemd gives a Type=notify
// service) the daemon reports READY=1 once it serves and STOPPING=1 on
// SIGTERM, then exits 0.
func TestSdNotify(t *testing.T) {
	e2e(t)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 1<<20)
	nsock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: nsock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	recv := func() string {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no sd_notify message: %v", err)
		}
		return string(buf[:n])
	}
	ctl := filepath.Join(dir, "data.ctl")
	cmd := exec.Command(nbdsnapBin, "serve", origin, "--name", "data", "--listen", "unix:"+filepath.Join(dir, "data.sock"),
		"--control", ctl, "--state-dir", filepath.Join(dir, "state"), "--log-level", "error")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+nsock)
	var logs testenv.SyncBuffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if msg := recv(); !strings.Contains(msg, "READY=1") {
		t.Fatalf("first notification %q", msg)
	}
	// Ready means serving: the control socket answers at once.
	mustCLI(t, "status", "--control", ctl)
	cmd.Process.Signal(syscall.SIGTERM)
	if msg := recv(); !strings.Contains(msg, "STOPPING=1") {
		t.Fatalf("notification after SIGTERM %q", msg)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, logs.String())
	}
}
