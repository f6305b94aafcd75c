package devinfo

import (
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// sysTree describes a fake sysfs: files (path → content; a path ending in
// "/" is an empty directory) and the device's /sys/dev/block link target,
// relative to the sysfs root.
type sysTree struct {
	files  map[string]string
	device string
}

// build writes the tree under a new temporary directory and returns it.
func (s sysTree) build(t *testing.T, rdev uint64) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range s.files {
		full := filepath.Join(root, p)
		if strings.HasSuffix(p, "/") {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Like the real /sys/dev/block/MAJ:MIN, a relative link into
	// /sys/devices.
	links := filepath.Join(root, "dev", "block")
	if err := os.MkdirAll(links, 0o755); err != nil {
		t.Fatal(err)
	}
	if s.device != "" {
		if err := os.Symlink(filepath.Join("..", "..", s.device), filepath.Join(links, devString(rdev))); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestBlockKeys(t *testing.T) {
	const (
		sda   = "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
		vda   = "devices/pci0000:00/0000:00:02.0/virtio1/block/vda"
		nvme  = "devices/pci0000:00/0000:00:03.0/nvme/nvme0/nvme0n1"
		loop0 = "devices/virtual/block/loop0"
	)
	backing := &unix.LoopInfo64{Device: unix.Mkdev(254, 0), Inode: 12, Offset: 4096, Sizelimit: 1 << 20}
	tests := []struct {
		name    string
		tree    sysTree
		rdev    uint64
		loop    func() (*unix.LoopInfo64, error) // nil: must not be called
		want    map[string]string
		wantErr string
	}{
		{
			name: "whole scsi disk with device/wwid",
			tree: sysTree{device: sda, files: map[string]string{
				sda + "/dev":         "8:0\n",
				sda + "/diskseq":     "9\n",
				sda + "/device/wwid": "naa.5000c500a1b2c3d4\n",
			}},
			rdev: unix.Mkdev(8, 0),
			want: map[string]string{"wwid": "naa.5000c500a1b2c3d4"},
		},
		{
			name: "virtio disk with serial",
			tree: sysTree{device: vda, files: map[string]string{
				vda + "/serial": "QM00001\n",
			}},
			rdev: unix.Mkdev(254, 0),
			want: map[string]string{"serial": "QM00001"},
		},
		{
			name: "virtio disk with an empty serial",
			tree: sysTree{device: vda, files: map[string]string{
				vda + "/serial": "\n",
			}},
			rdev: unix.Mkdev(254, 0),
			want: nil,
		},
		{
			name: "nvme namespace wwid and controller serial",
			tree: sysTree{device: nvme, files: map[string]string{
				nvme + "/wwid":          "eui.0025388b91b2c3d4\n",
				nvme + "/device/serial": "S4EWNX0R123456      \n",
				nvme + "/device/wwid":   "ignored, the disk's own wwid wins\n",
			}},
			rdev: unix.Mkdev(259, 0),
			want: map[string]string{"wwid": "eui.0025388b91b2c3d4", "serial": "S4EWNX0R123456"},
		},
		{
			name: "device-mapper",
			tree: sysTree{device: "devices/virtual/block/dm-0", files: map[string]string{
				"devices/virtual/block/dm-0/dm/name": "vg-lv\n",
				"devices/virtual/block/dm-0/dm/uuid": "LVM-Xyz123\n",
			}},
			rdev: unix.Mkdev(253, 0),
			want: map[string]string{"dm.uuid": "LVM-Xyz123"},
		},
		{
			name: "device-mapper without a uuid",
			tree: sysTree{device: "devices/virtual/block/dm-1", files: map[string]string{
				"devices/virtual/block/dm-1/dm/name": "plain\n",
				"devices/virtual/block/dm-1/dm/uuid": "\n",
			}},
			rdev: unix.Mkdev(253, 1),
			want: nil,
		},
		{
			name: "md array",
			tree: sysTree{device: "devices/virtual/block/md0", files: map[string]string{
				"devices/virtual/block/md0/md/level": "raid1\n",
				"devices/virtual/block/md0/md/uuid":  "3c6a9b2e-1f2d-4e5f-8a9b-0c1d2e3f4a5b\n",
			}},
			rdev: unix.Mkdev(9, 0),
			want: map[string]string{"md.uuid": "3c6a9b2e-1f2d-4e5f-8a9b-0c1d2e3f4a5b"},
		},
		{
			name: "partition of a disk",
			tree: sysTree{device: sda + "/sda2", files: map[string]string{
				sda + "/device/wwid":    "naa.5000c500a1b2c3d4\n",
				sda + "/sda2/partition": "2\n",
				sda + "/sda2/start":     "1050624\n",
				sda + "/sda2/dev":       "8:2\n",
			}},
			rdev: unix.Mkdev(8, 2),
			want: map[string]string{"part": "2@1050624", "wwid": "naa.5000c500a1b2c3d4"},
		},
		{
			name: "partition without start",
			tree: sysTree{device: sda + "/sda2", files: map[string]string{
				sda + "/sda2/partition": "2\n",
			}},
			rdev:    unix.Mkdev(8, 2),
			wantErr: "has no start",
		},
		{
			name: "no identifiers at all",
			tree: sysTree{device: "devices/virtual/block/zram0", files: map[string]string{
				"devices/virtual/block/zram0/size":    "2097152\n",
				"devices/virtual/block/zram0/diskseq": "3\n",
			}},
			rdev: unix.Mkdev(252, 0),
			want: nil,
		},
		{
			name: "attribute whose read fails",
			tree: sysTree{device: sda, files: map[string]string{
				// A directory opens but does not read, like a sysfs
				// attribute whose show function returns an error.
				sda + "/device/wwid/":  "",
				sda + "/device/serial": "ZA1B2C3D\n",
			}},
			rdev: unix.Mkdev(8, 0),
			want: map[string]string{"serial": "ZA1B2C3D"},
		},
		{
			name: "loop device",
			tree: sysTree{device: loop0, files: map[string]string{
				loop0 + "/loop/backing_file": "/var/lib/a.img\n",
			}},
			rdev: unix.Mkdev(7, 0),
			loop: func() (*unix.LoopInfo64, error) { return backing, nil },
			want: map[string]string{"loop": "dev=254:0 ino=12 offset=4096 sizelimit=1048576"},
		},
		{
			name: "partition of a loop device",
			tree: sysTree{device: loop0 + "/loop0p1", files: map[string]string{
				loop0 + "/loop/backing_file": "/var/lib/a.img\n",
				loop0 + "/loop0p1/partition": "1\n",
				loop0 + "/loop0p1/start":     "2048\n",
			}},
			rdev: unix.Mkdev(259, 3),
			loop: func() (*unix.LoopInfo64, error) { return backing, nil },
			want: map[string]string{"part": "1@2048", "loop": "dev=254:0 ino=12 offset=4096 sizelimit=1048576"},
		},
		{
			name:    "loop device with nothing attached",
			tree:    sysTree{device: loop0, files: map[string]string{loop0 + "/loop/": ""}},
			rdev:    unix.Mkdev(7, 0),
			loop:    func() (*unix.LoopInfo64, error) { return nil, unix.ENXIO },
			wantErr: "loop device has no backing file",
		},
		{
			name:    "not in sysfs",
			tree:    sysTree{},
			rdev:    unix.Mkdev(8, 16),
			wantErr: "find block device 8:16 in sysfs",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := tt.tree.build(t, tt.rdev)
			loop := tt.loop
			if loop == nil {
				loop = func() (*unix.LoopInfo64, error) {
					t.Error("loop status read for a device that is not a loop device")
					return nil, unix.ENXIO
				}
			}
			got, err := blockKeys(root, tt.rdev, loop)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("blockKeys error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("blockKeys: %v", err)
			}
			if !maps.Equal(got, tt.want) {
				t.Fatalf("blockKeys = %v, want %v", got, tt.want)
			}
		})
	}
}
