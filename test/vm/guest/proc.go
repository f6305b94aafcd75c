package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// proc is a server process the agent started: nbdsnap serve or nbdkit.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited; err is then set
	err  error
}

func (g *guest) start(name string, env []string, args ...string) (*proc, error) {
	g.log.Debug("start", "cmd", strings.Join(args, " "))
	cmd := exec.Command(args[0], args[1:]...)
	out := &prefixWriter{prefix: name + ": ", w: os.Stdout}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop sends SIGTERM and requires a clean exit (status 0) in time.
func (p *proc) stop(ctx context.Context) error {
	if p.exited() {
		return fmt.Errorf("%s had already exited: %v", p.name, p.err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		p.kill()
		return fmt.Errorf("%s did not exit within 30s of SIGTERM", p.name)
	case <-ctx.Done():
		p.kill()
		return ctx.Err()
	}
	if p.err != nil {
		return fmt.Errorf("%s after SIGTERM: %w", p.name, p.err)
	}
	return nil
}

// The daemon's paths in the guest. The origin is a sparse image in tmpfs:
// the kernel's page cache keeps what the daemon wrote across a kill -9,
// as a disk would.
const (
	originImage = "/work/origin.img"
	originSize  = 64 << 20
	exportName  = "data"
	serveSock   = "/run/nbdsnap/data.sock"
	controlSock = "/run/nbdsnap/data.ctl"
	stateDir    = "/work/state"
)

// createOrigin makes the sparse origin image.
func createOrigin() error { return createImage(originImage, originSize) }

// createImage makes a new sparse image file of size bytes.
func createImage(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// serve starts `nbdsnap serve` on the scenarios' origin image, with extra
// flags after the usual ones.
func (g *guest) serve(ctx context.Context, extra ...string) (*proc, error) {
	return g.serveOrigin(ctx, originImage, stateDir, extra...)
}

// serveOrigin starts `nbdsnap serve` on an origin with a state directory and
// extra flags (more listeners, TLS) and waits for its readiness notification
// (sd_notify READY=1, the daemon's documented readiness signal), failing
// early if it exits instead.
func (g *guest) serveOrigin(ctx context.Context, origin, state string, extra ...string) (*proc, error) {
	if err := os.MkdirAll("/run/nbdsnap", 0o755); err != nil {
		return nil, err
	}
	notifyPath := fmt.Sprintf("/run/notify-%d.sock", time.Now().UnixNano())
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		return nil, err
	}
	args := append([]string{"nbdsnap", "serve", origin, "--name", exportName,
		"--listen", "unix:" + serveSock, "--control", controlSock, "--state-dir", state}, extra...)
	p, err := g.start("nbdsnap", []string{"NOTIFY_SOCKET=" + notifyPath}, args...)
	if err != nil {
		notify.Close()
		os.Remove(notifyPath)
		return nil, err
	}
	// The socket lives as long as the daemon, as systemd's does: the
	// daemon also reports STOPPING=1.
	go func() {
		<-p.done
		notify.Close()
		os.Remove(notifyPath)
	}()
	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		notify.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			n, _, err := notify.ReadFromUnix(buf)
			if err != nil {
				if p.exited() {
					return // the select below reports the exit
				}
				ready <- fmt.Errorf("no READY=1 from nbdsnap serve within 30s: %w", err)
				return
			}
			for _, l := range strings.Split(string(buf[:n]), "\n") {
				if l == "READY=1" {
					ready <- nil
					notify.SetReadDeadline(time.Time{})
					drain(notify, buf)
					return
				}
			}
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			p.kill()
			return nil, err
		}
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("nbdsnap serve exited before it was ready: %v", p.err)
	case <-ctx.Done():
		p.kill()
		return nil, ctx.Err()
	}
}

// nbdsnap runs a client command against the daemon's control socket.
func (g *guest) nbdsnap(ctx context.Context, args ...string) (string, error) {
	return g.run(ctx, "nbdsnap", append(args, "--control", controlSock)...)
}

// snap1Store is the backing store of the scenarios' snapshot, snap1.
const snap1Store = "/work/snap1.cow"

// createSnap1 takes the scenarios' snapshot, snap1, into snap1Store, with
// further create flags.
func (g *guest) createSnap1(ctx context.Context, flags ...string) error {
	_, err := g.nbdsnap(ctx, append([]string{"create", "snap1", "--backing", snap1Store}, flags...)...)
	return err
}

// snapStatus is the part of `nbdsnap status --json` the scenarios check.
type snapStatus struct {
	Name           string `json:"name"`
	State          string `json:"state"`
	Reason         string `json:"reason"`
	Persistent     bool   `json:"persistent"`
	ClustersCopied int64  `json:"clusters_copied"`
	ClustersTotal  int64  `json:"clusters_total"`
}

// status reads one snapshot's status. The command prints either the one
// object or a list; both are accepted.
func (g *guest) status(ctx context.Context, snap string) (snapStatus, error) {
	out, err := g.run(ctx, "nbdsnap", "status", snap, "--json", "--control", controlSock)
	if err != nil {
		return snapStatus{}, err
	}
	g.log.Debug("status", "json", strings.TrimSpace(out))
	var one snapStatus
	if err := json.Unmarshal([]byte(out), &one); err == nil && one.Name != "" {
		return one, nil
	}
	var list []snapStatus
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return snapStatus{}, fmt.Errorf("nbdsnap status %s --json: %w\n%s", snap, err, out)
	}
	for _, s := range list {
		if s.Name == snap {
			return s, nil
		}
	}
	return snapStatus{}, fmt.Errorf("nbdsnap status %s --json does not list %s:\n%s", snap, snap, out)
}

// requireValid checks that a snapshot is reported valid.
func (g *guest) requireValid(ctx context.Context, snap string) (snapStatus, error) {
	st, err := g.status(ctx, snap)
	if err != nil {
		return st, err
	}
	if st.State != "valid" {
		return st, fmt.Errorf("snapshot %s is %q (reason %q), expected valid", snap, st.State, st.Reason)
	}
	return st, nil
}

// drain reads and drops notifications until the socket is closed.
func drain(c *net.UnixConn, buf []byte) {
	for {
		if _, _, err := c.ReadFromUnix(buf); err != nil {
			return
		}
	}
}
