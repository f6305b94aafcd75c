package devinfo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"golang.org/x/sys/unix"
)

// The tests in this file use the real kernel: regular files in a temporary
// directory, loop devices (root and losetup) and wipefs.

func ofPath(t *testing.T, path string) Identity {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	id, err := Of(f)
	if err != nil {
		t.Fatalf("Of(%s): %v", path, err)
	}
	return id
}

func TestOfFileRecreated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "origin.img")
	data := make([]byte, 64<<10)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	first := ofPath(t, path)
	t.Logf("identity: %v", first)
	if first.Kind != "file" || first.Size != int64(len(data)) {
		t.Fatalf("Of = %v, want a file of %d bytes", first, len(data))
	}
	for _, k := range []string{"dev", "ino"} {
		if first.Keys[k] == "" {
			t.Errorf("Of has no %s: %v", k, first)
		}
	}
	if first.Weak() {
		t.Errorf("a file's identity is weak: %v", first)
	}
	if err := Match(first, ofPath(t, path)); err != nil {
		t.Fatalf("the same file does not match itself: %v", err)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	second := ofPath(t, path)
	t.Logf("recreated: %v", second)
	if second.Keys["ino"] == first.Keys["ino"] && first.Keys["btime"] == "" && first.Keys["gen"] == "" {
		t.Skipf("SKIP: this file system reused the inode and reports neither birth time nor generation; a recreated file cannot be told apart here")
	}
	if err := Match(first, second); err == nil {
		t.Fatalf("a file deleted and recreated at the same path matches the original: %v, %v", first, second)
	} else {
		t.Logf("recreated file: %v", err)
	}
}

func TestOfOther(t *testing.T) {
	f, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := Of(f); err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
		t.Fatalf("Of(directory) error = %v, want not a regular file or block device", err)
	}
}

// image creates a file of size bytes filled with a pattern of seed, so two
// images differ in content as well as in inode.
func image(t *testing.T, name string, size int, seed byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	data := make([]byte, size)
	for i := 0; i < size; i += 4096 {
		data[i] = seed
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// attach attaches img to a free loop device and returns the device and a
// function that detaches it, also run at cleanup. Detaching once only
// matters: a loop device number freed here may already belong to another
// test that attached it since.
func attach(t *testing.T, img string) (dev string, detach func()) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "losetup")
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s", img, err, out)
	}
	dev = strings.TrimSpace(string(out))
	done := false
	detach = func() {
		if done {
			return
		}
		done = true
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	}
	t.Cleanup(detach)
	return dev, detach
}

func TestOfLoop(t *testing.T) {
	const size = 8 << 20
	imgA := image(t, "a.img", size, 'a')
	imgB := image(t, "b.img", size, 'b')
	devA, detachA := attach(t, imgA)
	devB, _ := attach(t, imgB)

	idA := ofPath(t, devA)
	idB := ofPath(t, devB)
	t.Logf("%s: %v", devA, idA)
	t.Logf("%s: %v", devB, idB)
	for _, id := range []Identity{idA, idB} {
		if id.Kind != "block" || id.Size != size || id.Keys["loop"] == "" || id.Weak() {
			t.Fatalf("Of(loop device) = %v, want a block device of %d bytes with a loop key", id, size)
		}
	}
	err := Match(idA, idB)
	if err == nil {
		t.Fatalf("loop devices over different images of the same size match: %v, %v", idA, idB)
	}
	if !strings.Contains(err.Error(), "loop") {
		t.Errorf("Match error %q does not name the loop key", err)
	}

	// Re-attached, to whichever loop device is free now, the first image
	// is the same origin again.
	detachA()
	devA2, _ := attach(t, imgA)
	idA2 := ofPath(t, devA2)
	t.Logf("%s re-attached as %s: %v", imgA, devA2, idA2)
	if err := Match(idA, idA2); err != nil {
		t.Fatalf("the re-attached image does not match: %v", err)
	}
}

func TestSignaturesReal(t *testing.T) {
	testenv.RequireTool(t, "wipefs")
	const size = 64 << 20
	tests := []struct {
		name    string
		tool    string                         // must be installed; "" for none
		prepare func(t *testing.T, img string) // writes the signature to the image
		want    []string                       // signature types, in wipefs's order
		label   string                         // of the first signature
	}{
		{name: "blank", want: nil},
		{
			name: "ext4", tool: "mkfs.ext4",
			prepare: func(t *testing.T, img string) { run(t, "", "mkfs.ext4", "-q", "-F", "-L", "data", img) },
			want:    []string{"ext4"},
			label:   "data",
		},
		{
			name: "swap", tool: "mkswap",
			prepare: func(t *testing.T, img string) { run(t, "", "mkswap", img) },
			want:    []string{"swap"},
		},
		{
			name: "dos partition table", tool: "sfdisk",
			prepare: func(t *testing.T, img string) { run(t, "label: dos\n,,83\n", "sfdisk", "-q", img) },
			want:    []string{"dos"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.tool != "" {
				testenv.RequireTool(t, tt.tool)
			}
			img := image(t, "sig.img", size, 0)
			if tt.prepare != nil {
				tt.prepare(t, img)
			}
			dev, _ := attach(t, img)
			sigs, err := Signatures(context.Background(), dev)
			if err != nil {
				t.Fatalf("Signatures(%s): %v", dev, err)
			}
			t.Logf("%s: %v", tt.name, sigs)
			var types []string
			for _, s := range sigs {
				types = append(types, s.Type)
			}
			if !slices.Equal(types, tt.want) {
				t.Fatalf("Signatures types = %q, want %q", types, tt.want)
			}
			if tt.label != "" && sigs[0].Label != tt.label {
				t.Errorf("label = %q, want %q", sigs[0].Label, tt.label)
			}
		})
	}
}

func TestSignaturesFails(t *testing.T) {
	testenv.RequireTool(t, "wipefs")
	missing := filepath.Join(t.TempDir(), "missing")
	_, err := Signatures(context.Background(), missing)
	if err == nil {
		t.Fatalf("Signatures(%s) = nil error", missing)
	}
	// wipefs's own message, on one line, tells the user why.
	if msg := err.Error(); !strings.Contains(msg, "wipefs") || !strings.Contains(msg, "No such file or directory") || strings.Contains(msg, "\n") {
		t.Fatalf("Signatures error = %q, want wipefs's reason on one line", msg)
	}
}

// run runs a command with stdin, failing the test with its output if it
// fails.
func run(t *testing.T, stdin string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// TestOfSystemDisks reads the identity of this machine's own block devices
// (loop devices aside, which TestOfLoop covers), to check the sysfs paths
// and BLKGETSIZE64 against a real kernel. It only opens them for reading.
func TestOfSystemDisks(t *testing.T) {
	testenv.RequireRoot(t)
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		t.Skipf("SKIP: no /sys/block: %v", err)
	}
	checked := 0
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, "loop") {
			continue
		}
		path := filepath.Join("/dev", name)
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
			continue
		}
		// The sysfs part needs no open device.
		keys, err := blockKeys("/sys", uint64(st.Rdev), func() (*unix.LoopInfo64, error) {
			return nil, fmt.Errorf("%s is not a loop device", path)
		})
		if err != nil {
			t.Errorf("blockKeys(%s): %v", path, err)
			continue
		}
		t.Logf("%s in sysfs: %v", path, keys)
		f, err := os.Open(path)
		if err != nil {
			// A container's device cgroup may forbid opening it.
			t.Logf("%s: %v", path, err)
			continue
		}
		f.Close()
		sectors, err := os.ReadFile(filepath.Join("/sys/block", name, "size"))
		if err != nil {
			t.Fatal(err)
		}
		id := ofPath(t, path)
		t.Logf("%s: %v (weak: %v)", path, id, id.Weak())
		if want := strings.TrimSpace(string(sectors)); id.Kind != "block" || strconv.FormatInt(id.Size/512, 10) != want {
			t.Errorf("Of(%s) = %v, want a block device of %s sectors", path, id, want)
		}
		if err := Match(id, ofPath(t, path)); err != nil {
			t.Errorf("%s does not match itself: %v", path, err)
		}
		checked++
	}
	if checked == 0 {
		t.Skip("SKIP: no block device other than loop devices can be opened here")
	}
}
