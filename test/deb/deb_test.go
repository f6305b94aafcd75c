// Package deb tests the Debian package that `make deb` builds: lintian
// passes it, it holds what a user needs, and installed into a scratch root
// (never the host's) its binary runs and its daemon unit verifies and serves.
package deb

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

func TestDeb(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and installs a package: skipped with -short")
	}
	for _, tool := range []string{"make", "git", "dpkg", "dpkg-deb", "lintian", "systemd-analyze"} {
		testenv.RequireTool(t, tool)
	}
	_, self, _, _ := runtime.Caller(0)
	repo := filepath.Join(filepath.Dir(self), "..", "..")

	out := t.TempDir()
	// BIN: a binary of this test's own, not bin/nbdsnap, which test/e2e's
	// TestInstall may be building at the same time.
	mk := exec.Command("make", "--no-print-directory", "deb", "DEBOUT="+out, "BIN="+filepath.Join(t.TempDir(), "nbdsnap"))
	mk.Dir = repo
	if b, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, b)
	}
	debs, _ := filepath.Glob(filepath.Join(out, "nbdsnap_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb left %q in its output directory, want one nbdsnap_*.deb", debs)
	}
	deb := debs[0]

	t.Run("lintian", func(t *testing.T) { lintian(t, deb) })
	t.Run("contents", func(t *testing.T) { contents(t, deb) })

	// dpkg --root installs into root with its own database there; the
	// maintainer scripts run on the host (--force-script-chrootless) with
	// DPKG_ROOT set, which they check before they touch the host's systemd.
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "var/lib/dpkg/status"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	inst := exec.Command("dpkg", "--root="+root, "--force-not-root", "--force-script-chrootless", "-i", deb)
	if b, err := inst.CombinedOutput(); err != nil {
		t.Fatalf("dpkg --root -i: %v\n%s", err, b)
	}
	if b, err := exec.Command("dpkg-query", "--root="+root, "-W", "-f=${Status}", "nbdsnap").Output(); err != nil || string(b) != "install ok installed" {
		t.Fatalf("dpkg-query in the scratch root: %q, %v", b, err)
	}
	bin := filepath.Join(root, "usr/bin/nbdsnap")
	t.Run("version", func(t *testing.T) { version(t, repo, bin) })
	unit := findUnit(t, root, "nbdsnap@.service")
	t.Run("verify", func(t *testing.T) { verify(t, root, unit) })
	t.Run("serve", func(t *testing.T) { serve(t, root, bin, unit) })
}

// lintian: no error or warning that the package's overrides do not justify
// (an overridden tag prints as O:, which passes).
func lintian(t *testing.T, deb string) {
	b, err := exec.Command("lintian", "--fail-on", "error,warning", deb).CombinedOutput()
	var bad []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "E: ") || strings.HasPrefix(line, "W: ") {
			bad = append(bad, line)
		}
	}
	if err != nil || len(bad) > 0 {
		t.Fatalf("lintian: %v\n%s", err, b)
	}
}

// contents: the binary, the units, man pages, completions and the
// copyright file, all owned by root.
func contents(t *testing.T, deb string) {
	b, err := exec.Command("dpkg-deb", "--contents", deb).Output()
	if err != nil {
		t.Fatalf("dpkg-deb --contents: %v", err)
	}
	var paths []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 {
			continue
		}
		if f[1] != "root/root" {
			t.Errorf("%s owned by %s, want root/root", f[5], f[1])
		}
		if f[5] == "./usr/bin/nbdsnap" && f[0] != "-rwxr-xr-x" {
			t.Errorf("usr/bin/nbdsnap has mode %s", f[0])
		}
		paths = append(paths, strings.TrimPrefix(f[5], "."))
	}
	for _, want := range []string{
		`^/usr/bin/nbdsnap$`,
		`^(/usr)?/lib/systemd/system/nbdsnap@\.service$`,
		`^(/usr)?/lib/systemd/system/nbdsnap-snapshot@\.service$`,
		`^(/usr)?/lib/systemd/system/nbdsnap\.target$`,
		`^/usr/share/man/man[18]/nbdsnap\.[18]\.gz$`,
		`^/usr/share/man/man[18]/nbdsnap-serve\.[18]\.gz$`,
		`^/usr/share/bash-completion/completions/nbdsnap$`,
		`^/usr/share/zsh/.*/_nbdsnap$`,
		`^/usr/share/fish/.*/nbdsnap\.fish$`,
		`^/usr/share/doc/nbdsnap/copyright$`,
		`^/usr/share/doc/nbdsnap/changelog\.Debian\.gz$`,
		`^/etc/nbdsnap/$`,
	} {
		re := regexp.MustCompile(want)
		found := false
		for _, p := range paths {
			found = found || re.MatchString(p)
		}
		if !found {
			t.Errorf("no file matching %s in the package:\n%s", want, b)
		}
	}
}

// version: the installed binary runs and reports the git describe that
// make stamped.
func version(t *testing.T, repo, bin string) {
	d := exec.Command("git", "describe", "--tags", "--always", "--dirty")
	d.Dir = repo
	want, err := d.Output()
	if err != nil {
		t.Fatalf("git describe: %v", err)
	}
	got, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", bin, err, got)
	}
	if !strings.Contains(string(got), strings.TrimSpace(string(want))) {
		t.Fatalf("--version says %q, want it to name %s", got, want)
	}
}

func findUnit(t *testing.T, root, name string) string {
	for _, dir := range []string{"lib/systemd/system", "usr/lib/systemd/system"} {
		if p := filepath.Join(root, dir, name); fileExists(p) {
			return p
		}
	}
	t.Fatalf("%s not installed", name)
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// verify: systemd-analyze verify, with the scratch root as root, passes an
// instance of the installed daemon unit; verify checks that ExecStart's
// binary exists, which it then does only because the package put it there.
// The root gets the host's own targets and slices (which the systemd
// package, not ours, provides) in usr/lib, for the unit's dependencies to
// resolve. A warning counts as a failure.
func verify(t *testing.T, root, unit string) {
	sys := filepath.Join(root, "usr/lib/systemd/system")
	if err := os.MkdirAll(sys, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, glob := range []string{"/lib/systemd/system/*.target", "/lib/systemd/system/*.slice"} {
		host, _ := filepath.Glob(glob)
		for _, h := range host {
			b, err := os.ReadFile(h)
			if err != nil {
				continue // a dangling alias
			}
			if err := os.WriteFile(filepath.Join(sys, filepath.Base(h)), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	inst := filepath.Join(filepath.Dir(unit), "nbdsnap@data.service")
	if err := os.Symlink(filepath.Base(unit), inst); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(inst)
	b, err := exec.Command("systemd-analyze", "verify", "--man=no", "--root="+root, strings.TrimPrefix(inst, root)).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(b))) != 0 {
		t.Fatalf("systemd-analyze verify --root: %v\n%s", err, b)
	}
}

// serve runs what nbdsnap@data.service's ExecStart runs, with the
// installed binary and the unit's own arguments, the sockets and state
// moved under the scratch root: the host's PID 1 may not be systemd, so
// the unit itself is not started. Then `nbdsnap status` must answer, and
// SIGTERM stop it with exit 0.
func serve(t *testing.T, root, bin, unit string) {
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ExecStart=(\S+) (.*)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no ExecStart in %s", unit)
	}
	if got := filepath.Join(root, string(m[1])); got != bin {
		t.Fatalf("ExecStart runs %s, the package installs %s", m[1], bin)
	}
	run := filepath.Join(root, "run/nbdsnap")
	if err := os.MkdirAll(run, 0o755); err != nil {
		t.Fatal(err)
	}
	origin := filepath.Join(root, "origin.img")
	if err := os.WriteFile(origin, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(run, "data.ctl")
	var args []string
	for _, a := range strings.Fields(string(m[2])) {
		switch a {
		case "${ORIGIN}":
			args = append(args, origin)
		case "$NBDSNAP_OPTS":
			args = append(args, "--listen", "unix:"+filepath.Join(run, "data.sock"), "--control", ctl)
		default:
			a = strings.ReplaceAll(a, "%i", "data")
			if strings.HasPrefix(a, "/var/lib/") {
				a = filepath.Join(root, a)
			}
			args = append(args, a)
		}
	}
	var log testenv.SyncBuffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve after SIGTERM: %v\n%s", err, log.String())
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Errorf("serve still running 10s after SIGTERM\n%s", log.String())
		}
	}()
	var status []byte
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if status, err = exec.Command(bin, "status", "--control", ctl).CombinedOutput(); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdsnap status: %v\n%s\ndaemon (%q):\n%s", err, status, args, log.String())
		}
	}
	if !strings.Contains(string(status), "data") {
		t.Fatalf("nbdsnap status does not name the origin:\n%s", status)
	}
	if !fileExists(filepath.Join(root, "var/lib/nbdsnap/data")) {
		t.Errorf("no state directory var/lib/nbdsnap/data in the scratch root")
	}
}
