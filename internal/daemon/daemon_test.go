package daemon

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/disktest"
)

func TestParseListen(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"unix:/run/x.sock", "unix:/run/x.sock", true},
		{"tcp::10809", "tcp:127.0.0.1:10809", true},
		{"tcp:0.0.0.0:10809", "tcp:0.0.0.0:10809", true},
		{"tcp:[::1]:0", "tcp:[::1]:0", true},
		{"tcp:localhost", "", false},
		{"tcp::99999", "", false},
		{"unix:", "", false},
		{"/run/x.sock", "", false},
		{"udp::1", "", false},
	}
	for _, tt := range tests {
		a, err := parseListen(tt.in)
		if (err == nil) != tt.ok || (tt.ok && a.String() != tt.want) {
			t.Errorf("parseListen(%q) = %v, %v; want %q ok=%v", tt.in, a, err, tt.want, tt.ok)
		}
	}
}

func TestValidName(t *testing.T) {
	for _, ok := range []string{"data", "snap-1", "a.b_c", "X9"} {
		if err := ValidName(ok); err != nil {
			t.Errorf("ValidName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".hidden", "-x", "a/b", "a b", strings.Repeat("x", 65), "é"} {
		if ValidName(bad) == nil {
			t.Errorf("ValidName(%q) accepted", bad)
		}
	}
}

// env is one test's origin, sockets and state directory.
type env struct {
	dir, origin, sock, ctl, state string
}

func newEnv(t *testing.T, size int64) env {
	t.Helper()
	dir := t.TempDir()
	e := env{dir: dir, origin: filepath.Join(dir, "origin.img"), sock: filepath.Join(dir, "data.sock"),
		ctl: filepath.Join(dir, "data.ctl"), state: filepath.Join(dir, "state")}
	if size > 0 {
		f, err := os.Create(e.origin)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return e
}

func (e env) config() Config {
	return Config{Name: "data", Origin: e.origin, Listen: []string{"unix:" + e.sock},
		Control: e.ctl, StateDir: e.state, Version: "test", Logger: slog.New(slog.DiscardHandler)}
}

func start(t *testing.T, cfg Config) *Daemon {
	t.Helper()
	d, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	return d
}

func TestStartRefusals(t *testing.T) {
	e := newEnv(t, 1<<20)
	held := start(t, e.config())
	_ = held

	other := newEnv(t, 1<<20)
	empty := newEnv(t, 0)
	os.WriteFile(empty.origin, nil, 0o600)

	tests := []struct {
		name string
		cfg  func() Config
		want string
	}{
		{"missing origin", func() Config { c := newEnv(t, 0).config(); return c }, "does not exist"},
		{"origin in use", func() Config {
			c := other.config()
			c.Origin = e.origin
			return c
		}, "origin " + e.origin + " is in use"},
		{"origin is a directory", func() Config { c := other.config(); c.Origin = other.dir; return c }, "neither a block device nor a regular file"},
		{"empty origin", func() Config { return empty.config() }, "is empty"},
		{"control socket taken", func() Config { c := other.config(); c.Control = e.ctl; return c }, "another daemon is listening there"},
		{"bad listen", func() Config { c := other.config(); c.Listen = []string{"udp::1"}; return c }, "want unix:PATH or tcp:HOST:PORT"},
		{"bad name", func() Config { c := other.config(); c.Name = "a/b"; return c }, "must be 1-64"},
		{"state dir of another origin", func() Config { c := other.config(); c.StateDir = e.state; return c }, "belongs to origin " + e.origin},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg()
			before := disktest.Record(t, e.dir, other.dir)
			d, err := Start(context.Background(), cfg)
			if err == nil {
				d.Shutdown(context.Background())
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q, want one line containing %q", err, tt.want)
			}
			before.Unchanged(t, disktest.Record(t, e.dir, other.dir))
		})
	}
	// The daemon that held everything still answers.
	if _, err := control.NewClient(e.ctl).Status(context.Background()); err != nil {
		t.Fatalf("first daemon: %v", err)
	}
}

func TestStaleSocketsReplaced(t *testing.T) {
	e := newEnv(t, 1<<20)
	for _, p := range []string{e.sock, e.ctl} {
		l, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		l.Close()
	}
	d := start(t, e.config())
	st, err := control.NewClient(e.ctl).Status(context.Background())
	if err != nil || st.Name != "data" || st.OriginSize != 1<<20 {
		t.Fatalf("status %+v, %v", st, err)
	}
	fi, err := os.Stat(e.ctl)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, %v", fi.Mode(), err)
	}
	if err := d.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{e.sock, e.ctl} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind after shutdown: %v", p, err)
		}
	}
	// The origin lock is released: another daemon can take it.
	start(t, e.config())
}

func TestTCPListenDefaultsToLoopback(t *testing.T) {
	e := newEnv(t, 1<<20)
	cfg := e.config()
	cfg.Listen = []string{"tcp::0"}
	d := start(t, cfg)
	if len(d.Addrs()) != 1 || !strings.HasPrefix(d.Addrs()[0], "tcp:127.0.0.1:") {
		t.Fatalf("addrs %v", d.Addrs())
	}
	c := nbdConnect(t, strings.TrimPrefix(d.Addrs()[0], "tcp:"), "tcp", "data")
	c.Close()
}

// nbdConnect opens an NBD connection to export name with the oldest
// newstyle option, NBD_OPT_EXPORT_NAME, and returns it once the server has
// attached it to the export (enough for OpenConns and busy checks).
func nbdConnect(t *testing.T, addr, network, name string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, 18) // NBDMAGIC, IHAVEOPT, handshake flags
	if _, err := io.ReadFull(c, hello); err != nil {
		t.Fatalf("nbd hello: %v", err)
	}
	flags := binary.BigEndian.Uint16(hello[16:])
	var out []byte
	out = binary.BigEndian.AppendUint32(out, uint32(flags&3)) // FIXED_NEWSTYLE | NO_ZEROES as offered
	out = binary.BigEndian.AppendUint64(out, 0x49484156454F5054)
	out = binary.BigEndian.AppendUint32(out, 1) // NBD_OPT_EXPORT_NAME
	out = binary.BigEndian.AppendUint32(out, uint32(len(name)))
	out = append(out, name...)
	if _, err := c.Write(out); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 10) // size, transmission flags (+124 zeros unless NO_ZEROES)
	if _, err := io.ReadFull(c, reply); err != nil {
		t.Fatalf("nbd export %q: %v", name, err)
	}
	if flags&2 == 0 {
		io.ReadFull(c, make([]byte, 124))
	}
	c.SetDeadline(time.Time{})
	return c
}

// FuzzParseListen: never panics; whatever it accepts renders to a form it
// accepts again unchanged, and TCP never comes out without a host.
func FuzzParseListen(f *testing.F) {
	for _, s := range []string{"unix:/run/x.sock", "tcp::10809", "tcp:[::1]:0", "tcp:host:1", "udp::1", "unix:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := parseListen(s)
		if err != nil {
			return
		}
		b, err := parseListen(a.String())
		if err != nil || b != a {
			t.Fatalf("%q → %v → %v, %v", s, a, b, err)
		}
		if a.network == "tcp" && strings.HasPrefix(a.addr, ":") {
			t.Fatalf("%q listens on all interfaces: %v", s, a)
		}
	})
}
