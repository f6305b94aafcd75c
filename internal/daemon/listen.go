package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// listenAddr is a parsed --listen value.
type listenAddr struct {
	network string // "unix" or "tcp"
	addr    string // socket path, or host:port with the host filled in
}

func (a listenAddr) String() string { return a.network + ":" + a.addr }

// parseListen parses "unix:PATH" or "tcp:HOST:PORT". TCP without a host
// listens on loopback only: exposing a writable origin to the network must
// be asked for by naming the address.
func parseListen(s string) (listenAddr, error) {
	network, rest, ok := strings.Cut(s, ":")
	switch {
	case !ok:
	case network == "unix" && rest != "":
		return listenAddr{"unix", rest}, nil
	case network == "tcp":
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return listenAddr{}, fmt.Errorf("listen address %q: %w", s, err)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			return listenAddr{}, fmt.Errorf("listen address %q: bad port %q", s, port)
		}
		if host == "" {
			host = "127.0.0.1"
		}
		return listenAddr{"tcp", net.JoinHostPort(host, port)}, nil
	}
	return listenAddr{}, fmt.Errorf("listen address %q: want unix:PATH or tcp:HOST:PORT", s)
}

// parseMetricsListen parses --metrics-listen: "HOST:PORT", ":PORT" (on
// loopback, as --listen's tcp does) or "tcp:HOST:PORT".
func parseMetricsListen(s string) (listenAddr, error) {
	a, err := parseListen("tcp:" + strings.TrimPrefix(s, "tcp:"))
	if err != nil {
		return listenAddr{}, fmt.Errorf("metrics %w", err)
	}
	return a, nil
}

// listen opens a listener. Unix sockets get mode 0600.
func listen(a listenAddr) (net.Listener, error) {
	if a.network == "unix" {
		return listenUnix(a.addr, 0o600)
	}
	l, err := net.Listen("tcp", a.addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", a, err)
	}
	return l, nil
}

// listenUnix listens on a unix socket at path with the given mode.
//
// The socket is bound under a temporary name, chmod-ed, then renamed into
// place, so that no other user can connect in the window between bind and
// chmod. A socket file left by a daemon that was killed is removed if
// nobody answers on it; a live one is an error (another daemon has it).
// The caller removes path when it closes the listener.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("listen on unix:%s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on unix:%s: a file that is not a socket is in the way", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on unix:%s: another daemon is listening there", path)
		}
		if !errors.Is(err, unix.ECONNREFUSED) {
			return nil, fmt.Errorf("listen on unix:%s: probe existing socket: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("listen on unix:%s: remove stale socket: %w", path, err)
		}
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	os.Remove(tmp)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen on unix:%s: %w", path, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen on unix:%s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen on unix:%s: %w", path, err)
	}
	return ul, nil
}
