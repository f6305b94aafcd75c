package cli

import (
	"runtime/debug"
	"testing"
)

// TestVersionOf: the linker's value wins, then the module version the go
// command recorded, then "devel".
func TestVersionOf(t *testing.T) {
	mod := func(v string) *debug.BuildInfo { return &debug.BuildInfo{Main: debug.Module{Version: v}} }
	for _, tt := range []struct {
		name    string
		stamped string
		bi      *debug.BuildInfo
		ok      bool
		want    string
	}{
		{"stamped", "v1.2.3-4-gabcdef0-dirty", mod("v1.2.0"), true, "v1.2.3-4-gabcdef0-dirty"},
		{"go install @version", "", mod("v1.2.0"), true, "v1.2.0"},
		{"go build in a checkout", "", mod("v0.0.0-20261121120000-abcdef012345+dirty"), true, "v0.0.0-20261121120000-abcdef012345+dirty"},
		{"no version known", "", mod("(devel)"), true, "devel"},
		{"empty module version", "", mod(""), true, "devel"},
		{"no build info", "", nil, false, "devel"},
	} {
		if got := versionOf(tt.stamped, tt.bi, tt.ok); got != tt.want {
			t.Errorf("%s: %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestVersionOutputs: --version and the version command print the same
// line; status shows the daemon's version (TestCommands, TestStatusJSON).
func TestVersionOutputs(t *testing.T) {
	dir := t.TempDir()
	flag, errs, code := run(t, dir, "--version")
	if code != 0 || errs != "" {
		t.Fatalf("--version: exit %d %q", code, errs)
	}
	cmd, errs, code := run(t, dir, "version")
	if code != 0 || errs != "" {
		t.Fatalf("version: exit %d %q", code, errs)
	}
	if want := versionLine("v-cli") + "\n"; flag != want || cmd != want {
		t.Fatalf("--version %q, version %q; want both %q", flag, cmd, want)
	}
}
