package cli

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// TestOriginForms: a client command reaches the origin's daemon named as
// ORIGIN/SNAP, as --origin NAME or as --name NAME (the hidden old
// spelling), and sends the daemon the bare snapshot name; an origin given
// twice with different names, or together with --control, is a usage error
// in one line.
func TestOriginForms(t *testing.T) {
	dir := t.TempDir()
	data := serveFake(t, dir, "data")
	other := serveFake(t, dir, "other")
	other.snaps = []control.SnapshotInfo{{Name: "o1", Origin: "other", State: control.StateValid}}
	ctl := filepath.Join(dir, "other.ctl")

	// requests lists what the fakes were asked to create and clear so far,
	// as "DAEMON: create SNAP" (each only once in this test).
	requests := func() []string {
		var r []string
		for _, f := range []*fakeDaemon{data, other} {
			f.mu.Lock()
			for _, c := range f.creates {
				r = append(r, f.name+": create "+c.Name)
			}
			for _, c := range f.clears {
				r = append(r, f.name+": clear "+c)
			}
			f.mu.Unlock()
		}
		return r
	}
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string // substring
		stderr string // exactly
		sent   string // the create or clear request the row made, if any
	}{
		{"create ORIGIN/SNAP", []string{"create", "other/s1", "--backing", "/b/s1"}, 0, "s1: origin other", "", "other: create s1"},
		{"create --origin", []string{"create", "s2", "--origin", "other", "--backing", "/b/s2"}, 0, "s2: origin other", "", "other: create s2"},
		{"create --name, the old spelling", []string{"create", "s3", "--name", "other", "--backing", "/b/s3"}, 0, "s3: origin other", "", "other: create s3"},
		{"ORIGIN/SNAP and the same --origin", []string{"create", "data/s4", "--origin", "data", "--backing", "/b/s4"}, 0, "s4: origin data", "", "data: create s4"},
		{"ORIGIN/SNAP and the same --name", []string{"clear", "data/s4", "--name", "data"}, 0, "s4: cleared\n", "", "data: clear s4"},
		{"clear ORIGIN/SNAP", []string{"clear", "other/s1"}, 0, "s1: cleared\n", "", "other: clear s1"},
		{"clear --origin", []string{"clear", "s2", "--origin", "other"}, 0, "s2: cleared\n", "", "other: clear s2"},
		{"status ORIGIN/SNAP", []string{"status", "other/o1"}, 0, "o1: origin other", "", ""},
		{"status ORIGIN/SNAP on another origin", []string{"status", "data/o1"}, 1, "", "nbdsnap: snapshot \"o1\": not found\n", ""},
		{"status --origin", []string{"status", "--origin", "other"}, 0, "other: origin /dev/vdb", "", ""},
		{"list --origin", []string{"list", "--origin", "other"}, 0, "o1: origin other", "", ""},
		{"list --name", []string{"list", "--name", "other"}, 0, "o1: origin other", "", ""},
		{"version --origin", []string{"version", "--origin", "other"}, 0, "daemon at " + ctl + ": nbdsnap v-test", "", ""},

		{"ORIGIN/SNAP and another --origin", []string{"create", "data/s5", "--origin", "other", "--backing", "/b/s5"}, 2, "",
			"nbdsnap: snapshot data/s5 is on origin data, but --origin says other; give the origin once\n", ""},
		{"ORIGIN/SNAP and another --name", []string{"clear", "data/snap0", "--name", "other"}, 2, "",
			"nbdsnap: snapshot data/snap0 is on origin data, but --name says other; give the origin once\n", ""},
		{"--origin and another --name", []string{"list", "--origin", "data", "--name", "other"}, 2, "",
			"nbdsnap: --origin data and --name other (its old spelling) differ; give --origin alone\n", ""},
		{"ORIGIN/SNAP and --control", []string{"status", "data/snap0", "--control", ctl}, 2, "",
			"nbdsnap: give --control or the origin (ORIGIN/SNAP), not both\n", ""},
		{"--origin and --control", []string{"list", "--origin", "data", "--control", ctl}, 2, "",
			"nbdsnap: give --control or the origin (--origin), not both\n", ""},
		{"no snapshot after the slash", []string{"clear", "data/"}, 2, "", "nbdsnap: snapshot \"data/\": want SNAP or ORIGIN/SNAP\n", ""},
		{"no origin before the slash", []string{"status", "/snap0"}, 2, "", "nbdsnap: snapshot \"/snap0\": want SNAP or ORIGIN/SNAP\n", ""},
		{"two slashes", []string{"status", "data/a/b"}, 2, "", "nbdsnap: snapshot \"data/a/b\": want SNAP or ORIGIN/SNAP\n", ""},
		{"origin that is not a name", []string{"list", "--origin", "../data"}, 2, "",
			"nbdsnap: --origin: origin name \"../data\" must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit\n", ""},
		{"two daemons, none chosen", []string{"list"}, 2, "", "nbdsnap: 2 daemons in " + dir + "; choose one with --origin NAME or ORIGIN/SNAP\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := requests()
			out, errs, code := run(t, dir, tt.args...)
			if code != tt.code || !strings.Contains(out, tt.stdout) || errs != tt.stderr {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d, %q, %q", code, out, errs, tt.code, tt.stdout, tt.stderr)
			}
			var made []string
			for _, r := range requests() {
				if !slices.Contains(before, r) {
					made = append(made, r)
				}
			}
			if got := strings.Join(made, ", "); got != tt.sent {
				t.Errorf("requests sent: %q, want %q", got, tt.sent)
			}
		})
	}
}

// TestNameFlagHidden: the client commands' help shows --origin, not its
// old spelling --name; serve keeps --name as its own flag.
func TestNameFlagHidden(t *testing.T) {
	for _, c := range []string{"create", "clear", "status", "list", "version"} {
		out, errs, code := run(t, t.TempDir(), c, "--help")
		if code != 0 || !strings.Contains(out, "--origin") || strings.Contains(out, "--name") {
			t.Errorf("%s --help: exit %d %q\n%s", c, code, errs, out)
		}
	}
	if out, _, _ := run(t, t.TempDir(), "serve", "--help"); !strings.Contains(out, "--name string") {
		t.Errorf("serve --help lacks --name:\n%s", out)
	}
}
