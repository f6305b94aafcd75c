package devinfo

import (
	"encoding/json"
	"strings"
	"testing"
)

func file(size int64, kv ...string) Identity {
	return Identity{Kind: "file", Size: size, Keys: keys(kv...)}
}

func block(size int64, kv ...string) Identity {
	return Identity{Kind: "block", Size: size, Keys: keys(kv...)}
}

// keys builds a key map from alternating names and values.
func keys(kv ...string) map[string]string {
	if len(kv) == 0 {
		return nil
	}
	m := make(map[string]string)
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func TestMatch(t *testing.T) {
	const gib = 1 << 30
	f := file(4096, "dev", "254:0", "fsid", "1b2c3d4e5f607182", "ino", "1234", "btime", "1700000000123456789", "gen", "987654")
	loopA := "dev=254:0 ino=12 offset=0 sizelimit=0"
	loopB := "dev=254:0 ino=13 offset=0 sizelimit=0"
	tests := []struct {
		name      string
		recorded  Identity
		current   Identity
		wantErr   string // substring of the error; "" for a match
		wantMatch bool
	}{
		// Regular files.
		{name: "file same", recorded: f, current: f, wantMatch: true},
		{
			name:     "file recreated with a new inode",
			recorded: f,
			current:  file(4096, "dev", "254:0", "fsid", "1b2c3d4e5f607182", "ino", "1235", "btime", "1700000000999999999", "gen", "5"),
			wantErr:  "ino 1234 != 1235",
		},
		{
			name:     "file recreated with the same inode, new birth time",
			recorded: file(4096, "dev", "254:0", "ino", "1234", "btime", "1700000000123456789"),
			current:  file(4096, "dev", "254:0", "ino", "1234", "btime", "1700000555000000000"),
			wantErr:  "btime 1700000000123456789 != 1700000555000000000",
		},
		{
			name:     "file recreated with the same inode, new generation",
			recorded: file(4096, "dev", "254:0", "ino", "1234", "gen", "1"),
			current:  file(4096, "dev", "254:0", "ino", "1234", "gen", "2"),
			wantErr:  "gen 1 != 2",
		},
		{
			name:      "file birth time on one side only",
			recorded:  file(4096, "dev", "254:0", "ino", "1234", "btime", "1700000000123456789"),
			current:   file(4096, "dev", "254:0", "ino", "1234"),
			wantMatch: true,
		},
		{
			name:     "file same inode on another file system",
			recorded: f,
			current:  file(4096, "dev", "8:1", "fsid", "aaaaaaaabbbbbbbb", "ino", "1234", "btime", "1700000000123456789", "gen", "987654"),
			wantErr:  "dev 254:0 != 8:1, fsid 1b2c3d4e5f607182 != aaaaaaaabbbbbbbb",
		},
		{
			name:      "file dev changed but fsid same",
			recorded:  f,
			current:   file(4096, "dev", "0:45", "fsid", "1b2c3d4e5f607182", "ino", "1234", "btime", "1700000000123456789", "gen", "987654"),
			wantMatch: true,
		},
		{
			name:     "file dev changed and no fsid",
			recorded: file(4096, "dev", "0:44", "ino", "1234"),
			current:  file(4096, "dev", "0:45", "ino", "1234"),
			wantErr:  "dev 0:44 != 0:45",
		},
		{
			name:     "file size changed",
			recorded: f,
			current:  file(8192, "dev", "254:0", "fsid", "1b2c3d4e5f607182", "ino", "1234", "btime", "1700000000123456789", "gen", "987654"),
			wantErr:  "devinfo: the same file, but its size changed from 4096 to 8192 bytes",
		},
		{
			name:     "file became a block device",
			recorded: f,
			current:  block(4096, "serial", "QM00001"),
			wantErr:  "kind file != block",
		},

		// Block devices.
		{
			name:      "block serial equal",
			recorded:  block(8*gib, "serial", "QM00001"),
			current:   block(8*gib, "serial", "QM00001"),
			wantMatch: true,
		},
		{
			name:     "block serial differs",
			recorded: block(8*gib, "serial", "QM00001"),
			current:  block(8*gib, "serial", "QM00002"),
			wantErr:  "serial QM00001 != QM00002",
		},
		{
			name:     "block size differs",
			recorded: block(8*gib, "serial", "QM00001"),
			current:  block(4*gib, "serial", "QM00001"),
			wantErr:  "devinfo: the same block device, but its size changed from 8589934592 to 4294967296 bytes",
		},
		{
			name:      "block wwid on one side only, serial equal",
			recorded:  block(8*gib, "wwid", "naa.5000c500a1b2c3d4", "serial", "QM00001"),
			current:   block(8*gib, "serial", "QM00001"),
			wantMatch: true,
		},
		{
			name:     "block serial equal, wwid differs",
			recorded: block(8*gib, "wwid", "eui.0001", "serial", "S4EW"),
			current:  block(8*gib, "wwid", "eui.0002", "serial", "S4EW"),
			wantErr:  "wwid eui.0001 != eui.0002",
		},
		{
			name:     "block no name in common",
			recorded: block(8*gib, "wwid", "naa.5000c500a1b2c3d4"),
			current:  block(8*gib, "serial", "QM00001"),
			wantErr:  "no identifier in common (recorded wwid=naa.5000c500a1b2c3d4)",
		},
		{
			name:     "block partition recorded, whole disk now",
			recorded: block(gib, "part", "1@2048", "serial", "QM00001"),
			current:  block(gib, "serial", "QM00001"),
			wantErr:  "part 1@2048 != (none)",
		},
		{
			name:     "block whole disk recorded, partition now",
			recorded: block(gib, "serial", "QM00001"),
			current:  block(gib, "part", "1@2048", "serial", "QM00001"),
			wantErr:  "part (none) != 1@2048",
		},
		{
			name:     "block partition start differs",
			recorded: block(gib, "part", "1@2048", "serial", "QM00001"),
			current:  block(gib, "part", "1@4096", "serial", "QM00001"),
			wantErr:  "part 1@2048 != 1@4096",
		},
		{
			name:      "block loop same backing file",
			recorded:  block(gib, "loop", loopA),
			current:   block(gib, "loop", loopA),
			wantMatch: true,
		},
		{
			name:     "block loop backing file differs",
			recorded: block(gib, "loop", loopA),
			current:  block(gib, "loop", loopB),
			wantErr:  `loop "dev=254:0 ino=12 offset=0 sizelimit=0" != "dev=254:0 ino=13 offset=0 sizelimit=0"`,
		},
		{
			name:     "block loop recorded, plain disk now",
			recorded: block(gib, "loop", loopA),
			current:  block(gib),
			wantErr:  "loop",
		},
		{name: "block weak both sides", recorded: block(gib), current: block(gib), wantMatch: true},
		{name: "block weak sizes differ", recorded: block(gib), current: block(2 * gib), wantErr: "size"},
		{
			name:      "block weak recorded, named now",
			recorded:  block(gib),
			current:   block(gib, "serial", "QM00001"),
			wantMatch: true,
		},
		{
			name:     "block recorded serial, current none",
			recorded: block(gib, "serial", "QM00001"),
			current:  block(gib),
			wantErr:  "no identifier in common (recorded serial=QM00001)",
		},
		{
			name:     "block dm uuid differs",
			recorded: block(gib, "dm.uuid", "LVM-aaa"),
			current:  block(gib, "dm.uuid", "LVM-bbb"),
			wantErr:  "dm.uuid LVM-aaa != LVM-bbb",
		},
		{name: "unknown kind", recorded: Identity{Kind: "pipe"}, current: Identity{Kind: "pipe"}, wantErr: `unknown identity kind "pipe"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Match(tt.recorded, tt.current)
			if tt.wantMatch {
				if err != nil {
					t.Fatalf("Match(%v, %v) = %v, want nil", tt.recorded, tt.current, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Match(%v, %v) = nil, want an error containing %q", tt.recorded, tt.current, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Match error = %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestString(t *testing.T) {
	tests := []struct {
		id   Identity
		want string
	}{
		{block(1 << 30), "block size=1073741824"},
		{
			block(8589934592, "wwid", "naa.5000c500a1b2c3d4", "serial", "QM00001", "dm.uuid", "LVM-x"),
			"block size=8589934592 dm.uuid=LVM-x serial=QM00001 wwid=naa.5000c500a1b2c3d4",
		},
		{
			block(1<<20, "part", "2@4096", "loop", "dev=254:0 ino=12 offset=0 sizelimit=0"),
			`block size=1048576 loop="dev=254:0 ino=12 offset=0 sizelimit=0" part=2@4096`,
		},
		{
			file(4096, "ino", "1234", "dev", "8:1", "btime", "1700000000123456789", "gen", "7", "fsid", "0000abcd0000ef01"),
			"file size=4096 btime=1700000000123456789 dev=8:1 fsid=0000abcd0000ef01 gen=7 ino=1234",
		},
		{block(1, "serial", `odd "quoted" value`), `block size=1 serial="odd \"quoted\" value"`},
		{block(1, "serial", ""), `block size=1 serial=""`},
	}
	for _, tt := range tests {
		// Map iteration order is random; repeat to catch an unsorted form.
		for range 10 {
			if got := tt.id.String(); got != tt.want {
				t.Fatalf("String() = %q, want %q", got, tt.want)
			}
		}
	}
}

func TestWeak(t *testing.T) {
	tests := []struct {
		id   Identity
		want bool
	}{
		{block(1 << 30), true},
		{block(1<<30, "part", "1@2048"), true}, // a partition of a disk with no name
		{block(1<<30, "serial", "QM00001"), false},
		{block(1<<30, "part", "1@2048", "wwid", "naa.1"), false},
		{block(1<<30, "loop", "dev=254:0 ino=12 offset=0 sizelimit=0"), false},
		{file(4096, "dev", "8:1", "ino", "12"), false},
	}
	for _, tt := range tests {
		if got := tt.id.Weak(); got != tt.want {
			t.Errorf("%v: Weak() = %v, want %v", tt.id, got, tt.want)
		}
	}
}

// TestJSON pins the JSON form, which state records store.
func TestJSON(t *testing.T) {
	tests := []struct {
		id   Identity
		want string
	}{
		{block(1 << 30), `{"kind":"block","size":1073741824}`},
		{block(512, "serial", "QM00001"), `{"kind":"block","size":512,"keys":{"serial":"QM00001"}}`},
		{file(1, "ino", "5", "dev", "8:1"), `{"kind":"file","size":1,"keys":{"dev":"8:1","ino":"5"}}`},
	}
	for _, tt := range tests {
		b, err := json.Marshal(tt.id)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tt.want {
			t.Errorf("json.Marshal(%v) = %s, want %s", tt.id, b, tt.want)
		}
		var back Identity
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if err := Match(tt.id, back); err != nil {
			t.Errorf("identity does not match itself after a JSON round trip: %v", err)
		}
	}
}
