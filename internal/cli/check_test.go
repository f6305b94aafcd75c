package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// makeStore writes a persistent store holding two copied clusters.
func makeStore(t *testing.T, path string) {
	t.Helper()
	f, err := vfs.OS{}.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	st, err := backstore.Create(f, backstore.Options{Name: "snap1", ClusterSize: 64 << 10, OriginSize: 1 << 20,
		OriginID: "origin-x", Persistent: true, Created: time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 64<<10)
	if err := st.Commit([]backstore.Cluster{{Index: 0, Data: data}, {Index: 3, Data: data}}); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.cow")
	makeStore(t, good)
	bad := filepath.Join(dir, "bad.cow")
	makeStore(t, bad)
	// Wreck both header slots.
	f, _ := os.OpenFile(bad, os.O_RDWR, 0)
	f.WriteAt(bytes.Repeat([]byte{0xff}, 64<<10), 0)
	f.Close()

	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"good", []string{"check", good}, 0,
			good + ": snapshot snap1 of origin origin-x (1 MiB), taken 2026-11-21 12:00:00 UTC, persistent, 64 KiB clusters, 2 copied, 2 verified, batch 1, valid, ok", ""},
		{"good json", []string{"check", "--json", good}, 0, `"Clusters": 2`, ""},
		{"wrecked header", []string{"check", bad}, 1, "", bad + ": 1 problem(s): "},
		{"missing file", []string{"check", filepath.Join(dir, "nope")}, 1, "", "no such file"},
		{"no argument", []string{"check"}, 2, "", "nbdsnap: check needs BACKING: nbdsnap check BACKING\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errs, code := run(t, dir, tt.args...)
			if code != tt.code || !strings.Contains(out, tt.stdout) || !strings.Contains(errs, tt.stderr) {
				t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errs)
			}
			if tt.stderr == "" && errs != "" {
				t.Fatalf("stderr %q", errs)
			}
		})
	}
}
