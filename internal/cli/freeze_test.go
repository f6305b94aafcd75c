package cli

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestMountpoints(t *testing.T) {
	info := `22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:31 / /mnt/my\040data rw - ext4 /dev/loop0 rw
37 22 0:32 / /srv/a\134b rw - tmpfs tmpfs rw
bad line
`
	m, err := mountpoints(strings.NewReader(info))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/", "/mnt/my data", `/srv/a\b`} {
		if !m[p] {
			t.Errorf("%q missing from %v", p, m)
		}
	}
	if len(m) != 3 {
		t.Errorf("got %v", m)
	}
}

// checkFreeze is tested with made-up mountinfo: nothing here may call
// FIFREEZE, which on a wrong path would freeze the machine's root filesystem.
func TestCheckFreeze(t *testing.T) {
	mp := t.TempDir()
	mp, _ = filepath.EvalSymlinks(mp)
	sub := filepath.Join(mp, "x")
	info := "36 22 0:31 / " + mp + " rw - ext4 /dev/loop0 rw\n"
	tests := []struct {
		name   string
		path   string
		others map[string]string
		want   string // "" = accepted
	}{
		{"mountpoint", mp, map[string]string{"backing store directory": "/proc"}, ""},
		{"not a mountpoint", filepath.Dir(mp), nil, "not a mountpoint"},
		{"missing", filepath.Join(mp, "nope"), nil, "no such file"},
		{"backing on it", mp, map[string]string{"backing store directory": mp}, "the backing store directory " + mp + " is on the filesystem to freeze"},
		{"state dir on it", mp, map[string]string{"daemon's state directory": mp, "backing store directory": "/proc"}, "state directory"},
		{"other path missing: ignored", mp, map[string]string{"backing store directory": sub}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := checkFreeze(tt.path, strings.NewReader(info), tt.others)
			if tt.want == "" {
				if err != nil || got != mp {
					t.Fatalf("got %q, %v", got, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want %q", err, tt.want)
			}
		})
	}
}
