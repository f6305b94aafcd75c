package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// server is one NBD server process serving an origin file on a unix
// socket, and the URIs of its origin export and of its snapshot exports.
type server struct {
	kind   string
	cmd    *exec.Cmd
	dir    string // the server's own scratch directory, removed by stop
	origin string
	snaps  []string
	ctl    string // nbdsnap's control socket
}

func nbdURI(sock, export string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}

// startProc starts a server in the background; ready returns once it
// answers on sock.
func startProc(ctx context.Context, sock string, name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	if err := waitSocket(ctx, sock, 10*time.Second); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return cmd, nil
}

// waitSocket waits until an NBD server answers on a unix socket. The
// probe ends the handshake politely (NBD_OPT_ABORT), so that servers do
// not log a broken connection.
func waitSocket(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		err := probeNBD(path)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no NBD server on %s after %v: %w", path, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitControl waits until nbdsnap's control socket (HTTP) accepts.
func waitControl(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no control socket %s after %v: %w", path, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func probeNBD(path string) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	greeting := make([]byte, 18) // NBDMAGIC, IHAVEOPT, handshake flags
	if _, err := io.ReadFull(c, greeting); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	msg := make([]byte, 0, 20)
	msg = binary.BigEndian.AppendUint32(msg, 3) // FIXED_NEWSTYLE | NO_ZEROES
	msg = append(msg, "IHAVEOPT"...)
	msg = binary.BigEndian.AppendUint32(msg, 2) // NBD_OPT_ABORT
	msg = binary.BigEndian.AppendUint32(msg, 0)
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	// The reply to ABORT is optional; wait for it or for the close.
	_, _ = io.ReadFull(c, make([]byte, 20))
	return nil
}

func newServerDir(base, kind string) (string, error) {
	d, err := os.MkdirTemp(base, kind+".")
	if err != nil {
		return "", fmt.Errorf("server dir: %w", err)
	}
	return d, nil
}

func startNbdkit(ctx context.Context, base, origin string) (*server, error) {
	dir, err := newServerDir(base, "nbdkit")
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "s")
	cmd, err := startProc(ctx, sock, "nbdkit", "-f", "-U", sock, "file", origin)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return &server{kind: "nbdkit", cmd: cmd, dir: dir, origin: nbdURI(sock, "")}, nil
}

// startQemu serves origin with qemu-storage-daemon. With snapshot, the
// whole image-fleecing graph is put on the command line, so the point in
// time is the daemon's start:
//
//	origin export -> raw -> copy-before-write (file=origin, target=COW file)
//	snap export   -> snapshot-access -> the same copy-before-write node
//
// The COW target is a sparse file of the origin's size, as
// copy-before-write requires; on-cbw-error=break-snapshot keeps the origin
// writable when copying fails, like nbdsnap.
func startQemu(ctx context.Context, base, origin string, size int64, snapshot bool) (*server, error) {
	kind := "qemu"
	if snapshot {
		kind = "qemu-cbw"
	}
	dir, err := newServerDir(base, kind)
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "s")
	args := []string{"--blockdev", "driver=file,node-name=ofile,filename=" + origin}
	if snapshot {
		cow := filepath.Join(dir, "cow.img")
		if err := os.WriteFile(cow, nil, 0o600); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("cow target: %w", err)
		}
		if err := os.Truncate(cow, size); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("cow target: %w", err)
		}
		args = append(args,
			"--blockdev", "driver=file,node-name=tfile,filename="+cow,
			"--blockdev", "driver=copy-before-write,node-name=cbw,file=ofile,target=tfile,on-cbw-error=break-snapshot",
			"--blockdev", "driver=raw,node-name=origin,file=cbw",
			"--blockdev", "driver=snapshot-access,node-name=snap,file=cbw",
		)
	} else {
		args = append(args, "--blockdev", "driver=raw,node-name=origin,file=ofile")
	}
	args = append(args,
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=e0,node-name=origin,name=origin,writable=on")
	if snapshot {
		args = append(args, "--export", "type=nbd,id=e1,node-name=snap,name=snap")
	}
	cmd, err := startProc(ctx, sock, "qemu-storage-daemon", args...)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s := &server{kind: kind, cmd: cmd, dir: dir, origin: nbdURI(sock, "origin")}
	if snapshot {
		s.snaps = []string{nbdURI(sock, "snap")}
	}
	return s, nil
}

// nbdsnapOpts selects how startNbdsnap sets a daemon up.
type nbdsnapOpts struct {
	bin         string
	snapshots   int  // fresh snapshots created after the start
	transient   bool // --transient
	clusterSize int64
}

func startNbdsnap(ctx context.Context, base, origin string, o nbdsnapOpts) (*server, error) {
	kind := "nbdsnap"
	if o.snapshots > 0 && o.transient {
		kind = "nbdsnap-t"
	}
	dir, err := newServerDir(base, kind)
	if err != nil {
		return nil, err
	}
	sock, ctl := filepath.Join(dir, "s"), filepath.Join(dir, "c")
	cmd, err := startProc(ctx, sock, o.bin, "serve", origin, "--name", "o",
		"--listen", "unix:"+sock, "--control", ctl, "--state-dir", filepath.Join(dir, "state"),
		"--log-level", "error")
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s := &server{kind: kind, cmd: cmd, dir: dir, origin: nbdURI(sock, "o"), ctl: ctl}
	if err := waitControl(ctx, ctl, 10*time.Second); err != nil {
		s.stop()
		return nil, err
	}
	for i := 0; i < o.snapshots; i++ {
		name := "s" + strconv.Itoa(i)
		if _, err := s.create(ctx, o.bin, name, o.transient, o.clusterSize); err != nil {
			s.stop()
			return nil, err
		}
		s.snaps = append(s.snaps, nbdURI(sock, name))
	}
	return s, nil
}

// create takes a snapshot with the CLI, as a user would, and returns how
// long the command took.
func (s *server) create(ctx context.Context, bin, name string, transient bool, clusterSize int64) (time.Duration, error) {
	args := []string{"create", name, "--control", s.ctl, "--backing", filepath.Join(s.dir, name+".cow")}
	if transient {
		args = append(args, "--transient")
	}
	if clusterSize > 0 {
		args = append(args, "--cluster-size", strconv.FormatInt(clusterSize, 10))
	}
	t0 := time.Now()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("nbdsnap create %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return d, nil
}

func (s *server) clear(ctx context.Context, bin, name string) error {
	out, err := exec.CommandContext(ctx, bin, "clear", name, "--control", s.ctl).CombinedOutput()
	if err != nil {
		return fmt.Errorf("nbdsnap clear %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// snapStatus is the part of `nbdsnap status --json` the benchmark reads.
type snapStatus struct {
	Snapshots []struct {
		Name           string `json:"name"`
		State          string `json:"state"`
		Reason         string `json:"reason"`
		ClustersCopied int64  `json:"clusters_copied"`
		CreatePauseUS  int64  `json:"create_pause_us"`
	} `json:"snapshots"`
}

func (s *server) status(ctx context.Context, bin string) (snapStatus, error) {
	var st snapStatus
	out, err := exec.CommandContext(ctx, bin, "status", "--json", "--control", s.ctl).Output()
	if err != nil {
		return st, fmt.Errorf("nbdsnap status: %w", err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("nbdsnap status: %w", err)
	}
	return st, nil
}

// memKiB returns the process's resident set now and at its peak (VmRSS,
// VmHWM) in KiB.
func (s *server) memKiB() (rss, hwm int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v
		case "VmHWM:":
			hwm = v
		}
	}
	return rss, hwm
}

// stop ends the server with SIGTERM (nbdsnap then makes its snapshots
// durable), kills it if it lingers, and removes its directory.
func (s *server) stop() error {
	err := terminate(s.cmd, 60*time.Second)
	if rmErr := os.RemoveAll(s.dir); rmErr != nil && err == nil {
		err = rmErr
	}
	return err
}

func terminate(cmd *exec.Cmd, limit time.Duration) error {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ProcessState.Sys().(syscall.WaitStatus).Signaled() {
			return nil // nbdkit and qemu exit on the signal itself
		}
		if err != nil {
			return fmt.Errorf("%s after SIGTERM: %w", cmd.Path, err)
		}
		return nil
	case <-time.After(limit):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s ignored SIGTERM for %v", cmd.Path, limit)
	}
}
