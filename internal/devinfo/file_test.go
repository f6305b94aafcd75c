package devinfo

import (
	"runtime"
	"testing"
)

// TestFsIocGetVersion checks the derived ioctl number against the value
// <linux/fs.h> gives on the architectures where it is known.
func TestFsIocGetVersion(t *testing.T) {
	want := map[string]uint{
		"amd64": 0x80087601,
		"arm64": 0x80087601,
		"386":   0x80047601,
		"arm":   0x80047601,
	}
	w, ok := want[runtime.GOARCH]
	if !ok {
		t.Skipf("SKIP: FS_IOC_GETVERSION not known for %s", runtime.GOARCH)
	}
	if fsIocGetVersion != w {
		t.Fatalf("fsIocGetVersion = %#x, want %#x", uint(fsIocGetVersion), w)
	}
}
