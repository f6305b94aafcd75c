package cli

import "testing"

// TestUsageMessages: positional arguments missing or extra, and sizes out
// of range, are refused with exit 2 and exactly these lines: each names
// the argument and shows the command's synopsis.
func TestUsageMessages(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		stderr string
	}{
		{"create without SNAP", []string{"create", "--backing", "/b"},
			"create needs SNAP: nbdsnap create [ORIGIN/]SNAP --backing PATH"},
		{"create with two", []string{"create", "s1", "/b", "--origin", "data"},
			`create takes one SNAP, not 2 arguments ("s1" "/b"): nbdsnap create [ORIGIN/]SNAP --backing PATH`},
		{"clear without SNAP", []string{"clear", "--origin", "data"},
			"clear needs SNAP: nbdsnap clear [ORIGIN/]SNAP"},
		{"clear with two", []string{"clear", "a", "b"},
			`clear takes one SNAP, not 2 arguments ("a" "b"): nbdsnap clear [ORIGIN/]SNAP`},
		{"status with two", []string{"status", "a", "b"},
			`status takes at most one SNAP, not 2 arguments ("a" "b"): nbdsnap status [[ORIGIN/]SNAP]`},
		{"serve without ORIGIN", []string{"serve", "--name", "data"},
			"serve needs ORIGIN: nbdsnap serve ORIGIN --name NAME"},
		{"serve with two", []string{"serve", "/dev/vdb", "/dev/vdc", "--name", "data"},
			`serve takes one ORIGIN, not 2 arguments ("/dev/vdb" "/dev/vdc"): nbdsnap serve ORIGIN --name NAME`},
		{"check without BACKING", []string{"check"},
			"check needs BACKING: nbdsnap check BACKING"},
		{"check with two", []string{"check", "a.cow", "b.cow"},
			`check takes one BACKING, not 2 arguments ("a.cow" "b.cow"): nbdsnap check BACKING`},
		{"list with one", []string{"list", "data"},
			`list takes no arguments, got "data": nbdsnap list`},
		{"version with one", []string{"version", "data"},
			`version takes no arguments, got "data": nbdsnap version`},
		{"man with one", []string{"man", "out"},
			`man takes no arguments, got "out": nbdsnap man --dir DIR`},

		{"negative size", []string{"create", "s", "--backing", "/b", "--max-size", "-5M"},
			`invalid argument "-5M" for "--max-size" flag: size "-5M" is negative`},
		{"negative fraction", []string{"serve", "/dev/vdb", "--name", "data", "--cache-size", "-1.5G"},
			`invalid argument "-1.5G" for "--cache-size" flag: size "-1.5G" is negative`},
		{"negative cluster size", []string{"create", "s", "--backing", "/b", "--cluster-size", "-4K"},
			`invalid argument "-4K" for "--cluster-size" flag: size "-4K" is negative`},
		{"malformed size", []string{"create", "s", "--backing", "/b", "--max-size", "-x"},
			`invalid argument "-x" for "--max-size" flag: size "-x": not a number`},
		{"zero cluster size", []string{"create", "s", "--backing", "/b", "--cluster-size", "0"},
			"invalid --cluster-size 0 B: must be a power of two from 4K to 1M"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// An empty run directory: nothing may get as far as a daemon.
			out, errs, code := run(t, t.TempDir(), tt.args...)
			if want := "nbdsnap: " + tt.stderr + "\n"; code != ExitUsage || errs != want || out != "" {
				t.Fatalf("exit %d, stdout %q, stderr\n%q\nwant exit 2,\n%q", code, out, errs, want)
			}
		})
	}
}
