package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// guest is one scenario's view of the VM: a logger and the timed steps.
//
// Nothing is undone when a scenario fails: the VM is powered off right
// after the result line, and undoing (unmounting a file system whose
// server is gone, say) could itself hang for the dead-connection timeout
// and delay the report.
type guest struct {
	log *slog.Logger

	mu      sync.Mutex // guards steps and current: main reads them if a step hangs
	steps   []report.Step
	current string // the step in progress
}

// step runs one named, timed part of a scenario; its error names the step.
func (g *guest) step(name string, fn func() error) error {
	g.log.Info("step", "step", name)
	g.mu.Lock()
	g.current = name
	g.mu.Unlock()
	start := time.Now()
	err := fn()
	d := time.Since(start)
	g.mu.Lock()
	g.steps = append(g.steps, report.Step{Name: name, Seconds: d.Seconds()})
	g.current = ""
	g.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	g.log.Info("step done", "step", name, "took", d.Round(time.Millisecond))
	return nil
}

// progress returns the finished steps and the one in progress.
func (g *guest) progress() ([]report.Step, string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]report.Step(nil), g.steps...), g.current
}

// run executes a command and returns its combined output; a non-zero exit
// is an error carrying the output.
func (g *guest) run(ctx context.Context, name string, args ...string) (string, error) {
	out, code, err := g.runCode(ctx, name, args...)
	if err == nil && code != 0 {
		err = fmt.Errorf("%s %s: exit status %d\n%s", name, strings.Join(args, " "), code, out)
	}
	return out, err
}

// runCode executes a command and returns its output and exit code; err is
// set only if it could not run or was killed.
func (g *guest) runCode(ctx context.Context, name string, args ...string) (string, int, error) {
	g.log.Debug("run", "cmd", name+" "+strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0, nil
	case errors.As(err, &exit) && exit.Exited():
		return out.String(), exit.ExitCode(), nil
	default:
		return out.String(), -1, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
}

// devIndex turns /dev/nbdN into N.
func devIndex(dev string) (int, error) {
	n, err := strconv.Atoi(strings.TrimPrefix(dev, "/dev/nbd"))
	if err != nil || !strings.HasPrefix(dev, "/dev/nbd") {
		return 0, fmt.Errorf("%s is not an NBD device", dev)
	}
	return n, nil
}

// pidFile is /sys/block/nbdN/pid, which exists while /dev/nbdN is attached:
// the driver's own sign that a connection is set up. /sys/block/nbdN/size
// alone can be stale.
func pidFile(dev string) string {
	return "/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/pid"
}

// waitAttached waits until dev's pidFile exists (present) or is gone.
func waitAttached(ctx context.Context, dev string, present bool) error {
	file := pidFile(dev)
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		_, err := os.Stat(file)
		if (err == nil) == present {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for %s to %s: %w", dev, file, map[bool]string{true: "appear", false: "disappear"}[present], ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// attach connects a kernel NBD device to an export with nbd-client over a
// unix socket.
func (g *guest) attach(ctx context.Context, dev, sock, export string, extra ...string) error {
	args := append([]string{"-unix", sock, dev, "-N", export}, extra...)
	if _, err := g.run(ctx, "nbd-client", args...); err != nil {
		return err
	}
	return waitAttached(ctx, dev, true)
}

// detach disconnects a device and waits until the driver has let go.
func (g *guest) detach(ctx context.Context, dev string) error {
	if _, err := os.Stat(pidFile(dev)); err != nil {
		return nil // not attached (any more)
	}
	if _, err := g.run(ctx, "nbd-client", "-d", dev); err != nil {
		return err
	}
	return waitAttached(ctx, dev, false)
}

func (g *guest) mount(ctx context.Context, dev, dir, opts string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	_, err := g.run(ctx, "mount", "-t", "ext4", "-o", opts, dev, dir)
	return err
}

func (g *guest) umount(ctx context.Context, dir string) error {
	_, err := g.run(ctx, "umount", dir)
	return err
}

func (g *guest) mkfs(ctx context.Context, dev string) error {
	_, err := g.run(ctx, "mkfs.ext4", "-q", "-F", dev)
	return err
}

// fsckClean runs e2fsck -fn and requires exit status 0: nothing to fix.
func (g *guest) fsckClean(ctx context.Context, dev string) error {
	out, code, err := g.runCode(ctx, "e2fsck", "-fn", dev)
	if err != nil {
		return err
	}
	g.log.Debug("e2fsck -fn", "dev", dev, "exit", code, "output", out)
	if code != 0 {
		return fmt.Errorf("e2fsck -fn %s: exit status %d, not clean:\n%s", dev, code, out)
	}
	return nil
}

// kernelLogProblems returns the kernel log lines that show an I/O error or
// a file system error, which none of the scenarios may cause on the origin.
func (g *guest) kernelLogProblems(ctx context.Context, devs ...string) ([]string, error) {
	out, err := g.run(ctx, "dmesg")
	if err != nil {
		return nil, err
	}
	var bad []string
	for _, line := range strings.Split(out, "\n") {
		for _, sign := range []string{"I/O error", "EXT4-fs error", "Aborting journal", "Remounting filesystem read-only", "JBD2: Error", "Detected aborted journal"} {
			if !strings.Contains(line, sign) {
				continue
			}
			for _, d := range devs {
				if strings.Contains(line, strings.TrimPrefix(d, "/dev/")) {
					bad = append(bad, line)
				}
			}
		}
	}
	return bad, nil
}

// noKernelProblems fails if the kernel logged an I/O or file system error
// about any of devs.
func (g *guest) noKernelProblems(ctx context.Context, devs ...string) error {
	bad, err := g.kernelLogProblems(ctx, devs...)
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		return fmt.Errorf("the kernel logged errors:\n%s", strings.Join(bad, "\n"))
	}
	return nil
}

// prefixWriter copies a child's output to the console, a line at a time,
// each line tagged with the child's name.
type prefixWriter struct {
	mu     sync.Mutex
	prefix string
	w      io.Writer
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			break
		}
		p.w.Write([]byte(p.prefix + string(p.buf[:i+1])))
		p.buf = p.buf[i+1:]
	}
	return len(b), nil
}

// freshStart checks that the previous scenario in this boot left nothing
// behind (no NBD device attached, no nbd-client process such as a TLS
// relay, nothing mounted under /mnt or /work: a passing scenario tears down
// what it set up, the daemon included), then empties /work and
// /run/nbdsnap and clears the kernel log, which the scenario will check for
// errors of its own.
func freshStart(ctx context.Context, g *guest) error {
	for _, dev := range []string{nbd0, nbd1} {
		if _, err := os.Stat(pidFile(dev)); err == nil {
			return fmt.Errorf("%s is still attached", dev)
		}
	}
	pids, err := liveNBDClients()
	if err != nil {
		return err
	}
	if len(pids) > 0 {
		return fmt.Errorf("nbd-client processes still running: %v", pids)
	}
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(l); len(f) > 1 && (strings.HasPrefix(f[1], "/mnt/") || strings.HasPrefix(f[1], "/work/")) {
			return fmt.Errorf("still mounted: %s", l)
		}
	}
	for _, dir := range []string{"/work", "/run/nbdsnap"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if err := os.RemoveAll(dir + "/" + e.Name()); err != nil {
				return err
			}
		}
	}
	_, err = g.run(ctx, "dmesg", "-c")
	return err
}
