package e2e

import (
	"bytes"
	"errors"
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

// stoppedReason is what a snapshot given up on at --stop-timeout says.
const stoppedReason = "daemon stopped before the store caught up"

// pythonNBD returns the Python that has libnbd's bindings (nbdsh is its
// `-m nbd`).
func pythonNBD(t *testing.T) string {
	t.Helper()
	py := testenv.RequireTool(t, "/usr/bin/python3")
	if err := exec.Command(py, "-c", "import nbd").Run(); err != nil {
		if testenv.Strict() {
			t.Fatalf("%s cannot import nbd: python3-libnbd is not installed (make deps installs it)", py)
		}
		t.Skipf("SKIP: python3-libnbd is not installed (make deps installs it)")
	}
	return py
}

// TestStopTimeoutStalledStore: `serve --stop-timeout 2s` with a persistent
// snapshot whose backing store is on a disk that stops answering (stallfs:
// a FUSE file system whose writes the test holds), and a write in flight
// that waits for it. SIGTERM: the daemon exits within 3 s with exit code 3
// (stop forced), and the origin holds exactly the answered writes.
// Restarted, the daemon lists the snapshot invalid with the reason (`list`,
// `status`) and does not serve it.
//
//   - A 20 MiB write waits for the snapshot's cache (8 MiB) while the
//     store's writer is stuck: it is released and answered.
//   - A 1 MiB write commits its clusters itself and is inside the stalled
//     store (--held-size 0: it waits for its commit before its answer): it
//     cannot be released; its connection is closed unanswered, and the
//     daemon exits anyway, its stuck thread left to the kernel.
//   - A 1 MiB write held (answered at once, its origin write waiting for
//     the commit, which it leads into the stalled store): the daemon exits
//     without it on the origin, and the restart replays it from the
//     held-writes log.
func TestStopTimeoutStalledStore(t *testing.T) {
	e2e(t)
	py := pythonNBD(t)
	for _, tt := range []struct {
		name     string
		size     int  // bytes written at 32 MiB while the store is stalled
		cacheful bool // the write waits for cache space, not inside the store
		answered bool
		held     bool   // answered before the stall is seen, on the origin only after the restart
		said     string // in the daemon's last line, after "stop forced at the stop timeout: "
	}{
		{"write waits for the cache", 20 << 20, true, true, false, "snapshot(s) s invalidated (" + stoppedReason + ")"},
		{"write inside the stalled store", 1 << 20, false, false, false, "snapshot(s) s invalidated (" + stoppedReason + "); NBD connections with requests in flight closed; gave up waiting for NBD requests in flight"},
		{"held write inside the stalled store", 1 << 20, false, true, true, "snapshot(s) s invalidated (" + stoppedReason + "); gave up waiting for the engine"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			stall := stallfs.Mount(t, t.TempDir())
			dir := t.TempDir()
			origin := filepath.Join(dir, "origin.img")
			initial := randomFile(t, origin, 64<<20)
			flags := []string{"--stop-timeout", "2s", "--cache-size", "8M"}
			if !tt.held {
				flags = append(flags, "--held-size", "0")
			}
			d := startDaemon(t, dir, origin, flags...)
			mustCLI(t, "create", "s", "--control", d.ctl, "--backing", filepath.Join(stall.Dir(), "s.cow"))
			run(t, py, "-m", "nbd", "-u", d.uri("data"), "-c", `h.pwrite(b"\xa1" * (1 << 20), 0)`)
			want := bytes.Clone(initial)
			copy(want, bytes.Repeat([]byte{0xa1}, 1<<20))

			stall.Hold()
			// One NBD request, as libnbd sends it (nbdsh).
			w := exec.Command(py, "-m", "nbd", "-u", d.uri("data"), "-c", fmt.Sprintf(`h.pwrite(b"\xb2" * %d, 32 << 20)`, tt.size))
			var wout bytes.Buffer
			w.Stdout, w.Stderr = &wout, &wout
			if err := w.Start(); err != nil {
				t.Fatal(err)
			}
			written := make(chan error, 1)
			go func() { written <- w.Wait() }()
			if tt.held {
				if err := <-written; err != nil {
					t.Fatalf("the held write was not answered: %v: %s", err, wout.String())
				}
				written <- nil
			}
			waitFor(t, func() bool {
				return stall.Blocked() > 0 && (!tt.cacheful || d.status(t).Snapshots[0].Stats.CacheFullWaits > 0)
			})
			if !tt.held {
				select {
				case err := <-written:
					t.Fatalf("the write finished (%v) while the store is stalled: %s", err, wout.String())
				default:
				}
			}

			begin := time.Now()
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(30 * time.Second):
				t.Fatalf("the daemon did not exit within 30s of SIGTERM")
			}
			took := time.Since(begin)
			var ee *exec.ExitError
			code := 0
			if errors.As(d.waitErr, &ee) {
				code = ee.ExitCode()
			}
			t.Logf("SIGTERM with --stop-timeout 2s: exit %d after %v", code, took)
			if took > 3*time.Second || code != 3 {
				t.Fatalf("exit %d after %v; want exit 3 (stop forced) within 3s\n%s", code, took, d.log.String())
			}
			if log := d.log.String(); !strings.Contains(log, "nbdsnap: shutdown: stop forced at the stop timeout: "+tt.said) {
				t.Fatalf("the daemon's last line does not say %q:\n%s", tt.said, log)
			}
			select {
			case err := <-written:
				if tt.answered && err != nil {
					t.Fatalf("the write waiting for the store was not answered: %v: %s", err, wout.String())
				}
				if !tt.answered && err == nil {
					t.Fatalf("the write inside the stalled store was answered: %s", wout.String())
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the write is still waiting after the daemon exited")
			}
			if tt.answered && !tt.held {
				copy(want[32<<20:], bytes.Repeat([]byte{0xb2}, tt.size))
			}
			if got, err := os.ReadFile(origin); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("the origin does not hold exactly the answered writes that reached it (read: %v)", err)
			}
			if tt.held {
				// It is in the held-writes log: the restart replays it.
				copy(want[32<<20:], bytes.Repeat([]byte{0xb2}, tt.size))
			}

			stall.Resume()
			d2 := startDaemon(t, dir, origin)
			if out := mustCLI(t, "list", "--control", d2.ctl); !strings.Contains(out, "s: ") || !strings.Contains(out, ", invalid ("+stoppedReason+")") {
				t.Fatalf("list after restart: %s", out)
			}
			st := d2.status(t)
			if len(st.Snapshots) != 1 {
				t.Fatalf("status after restart: %+v", st.Snapshots)
			}
			if s := st.Snapshots[0]; s.State != control.StateInvalid || s.Reason != stoppedReason || s.Served || !s.Persistent {
				t.Fatalf("after restart: state %s, reason %q, served %v; want invalid for %q and not served", s.State, s.Reason, s.Served, stoppedReason)
			}
			if got := readExport(t, d2.uri("data")); !bytes.Equal(got, want) {
				t.Fatal("the restarted daemon serves an origin without the answered writes")
			}
			if err := d2.stop(); err != nil {
				t.Fatalf("clean stop after restart: %v\n%s", err, d2.log.String())
			}
		})
	}
}
