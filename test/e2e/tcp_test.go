package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestTCPListen: --listen tcp::0 listens on loopback only, next to the unix
// socket, and serves the origin and snapshots there too.
func TestTCPListen(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	randomFile(t, origin, 4<<20)
	d := startDaemon(t, dir, origin, "--listen", "tcp::0")
	st := d.status(t)
	if len(st.Listen) != 2 || st.Listen[0] != "unix:"+d.sock || !strings.HasPrefix(st.Listen[1], "tcp:127.0.0.1:") {
		t.Fatalf("listen %v", st.Listen)
	}
	addr := strings.TrimPrefix(st.Listen[1], "tcp:")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", "nbd://"+addr+"/data")
	mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(dir, "s.cow"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x43 0 64k", "nbd://"+addr) // the default export is the origin
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 64k", "nbd://"+addr+"/s")
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x43 0 64k", d.uri("data"))
}
