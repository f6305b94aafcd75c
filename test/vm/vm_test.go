package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// scenarios run in this order, one VM boot each, so a hung or crashed guest
// costs one scenario and every scenario starts from a fresh kernel. The
// guest agent (test/vm/guest) implements them.
var scenarios = []string{
	"reference", // the harness itself, against nbdkit: attach, ext4, kill -9 + reconnect
	"freeze",    // issue 5 scenario 1: create --freeze, snapshot == set A exactly
	"nofreeze",  // scenario 2: sync + create, snapshot mounts ro,noload
	"crash",     // scenario 3: kill -9 during a write load, restart, reconnect
	"full",      // scenario 4: backing store too small, snapshot invalid, origin fine
	"readonly",  // scenario 5: the snapshot device is read-only to the kernel
}

// bootTimeout bounds one scenario's VM. The guest agent's own deadline is
// shorter, so a stuck step still reports; this one catches a stuck kernel.
const bootTimeout = 4 * time.Minute

// guestInit is the initramfs's /init: mount the pseudo file systems, load
// the modules, run the agent (which reads its scenario from /proc/cmdline
// and prints its result line), power off at once. No sync (poweroff -n):
// a failed scenario may leave a file system whose server is gone. A panic
// or an early exit ends the VM as well (panic=-1, -no-reboot), and the
// missing result line fails the test.
const guestInit = `#!/usr/bin/busybox sh
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /work /mnt
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs -o size=640m tmpfs /work
ip link set lo up
while read m; do
	insmod /usr/lib/modules/guest/$m || echo "init: insmod $m failed"
done < /usr/lib/modules/guest/order
/usr/bin/nbdsnap-vm-guest
echo "init: guest agent exited with status $?"
poweroff -n -f
`

func TestVM(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM per scenario for minutes; not under -short")
	}
	qemu := testenv.RequireTool(t, "qemu-system-x86_64")
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "xz", "ldd", "busybox", "mke2fs", "e2fsck", "nbd-client", "nbdkit", "go"} {
		testenv.RequireTool(t, tool)
	}
	start := time.Now()
	k, err := prepareKernel(t.Logf)
	if err != nil {
		t.Fatalf("guest kernel: %v", err)
	}
	initrd := filepath.Join(t.TempDir(), "initramfs.cpio")
	// A checkout whose nbdsnap does not build still boots the reference
	// scenario, which proves the harness; the others then fail with the
	// build error.
	nbdsnapErr, err := buildInitramfs(t, k, initrd)
	if err != nil {
		t.Fatalf("initramfs: %v", err)
	}
	t.Logf("kernel %s, initramfs ready in %v", k.Package, time.Since(start).Round(time.Millisecond))

	for _, name := range scenarios {
		t.Run(name, func(t *testing.T) {
			if nbdsnapErr != nil && name != "reference" {
				t.Fatalf("no nbdsnap binary for the guest: %v", nbdsnapErr)
			}
			b := boot{Qemu: qemu, Kernel: k.Vmlinux, Initrd: initrd, Timeout: bootTimeout,
				Append: []string{report.CmdlineKey + "=" + name}}
			began := time.Now()
			console, err := b.run(context.Background())
			wall := time.Since(began)
			r, rerr := scenarioResult(console, name)
			if dir := os.Getenv("NBDSNAP_VM_LOGS"); dir != "" {
				if err := os.WriteFile(filepath.Join(dir, name+".console"), []byte(console), 0o644); err != nil {
					t.Errorf("keep the console: %v", err)
				}
			}
			if err != nil || rerr != nil || !r.OK {
				t.Logf("guest console:\n%s", console)
				if err != nil {
					t.Errorf("%v", err)
				}
				if rerr != nil {
					t.Errorf("%v", rerr)
				} else if !r.OK {
					t.Errorf("scenario %s failed: %s", name, r.Error)
				}
			}
			var steps []string
			for _, s := range r.Steps {
				steps = append(steps, fmt.Sprintf("%s %.1fs", s.Name, s.Seconds))
			}
			t.Logf("scenario %s: %.1fs in the guest, %.1fs with boot; steps: %s",
				name, r.Seconds, wall.Seconds(), strings.Join(steps, ", "))
		})
	}
}

// buildInitramfs writes the guest's root file system: busybox, the host's
// e2fsprogs, nbd-client and nbdkit with their libraries, a static nbdsnap
// and the guest agent built from this checkout, the modules and /init.
//
// It returns separately the error of building nbdsnap, which leaves the
// binary out of the initramfs.
func buildInitramfs(t *testing.T, k *kernel, out string) (nbdsnapErr, err error) {
	bin := t.TempDir()
	static := func(pkg, name string) error {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(bin, name), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
		}
		return nil
	}
	if err := static("github.com/nbdsnap/nbdsnap/test/vm/guest", "nbdsnap-vm-guest"); err != nil {
		return nil, err
	}
	nbdsnapErr = static("github.com/nbdsnap/nbdsnap/cmd/nbdsnap", "nbdsnap")

	a := newArchive()
	// The host's top-level layout first (on a merged-/usr host these are
	// links into /usr), so that everything below lands where it does here.
	for _, d := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if _, err := os.Lstat(d); err == nil {
			if err := a.addHostPath(d); err != nil {
				return nil, err
			}
		}
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "work", "mnt", "etc", "usr/bin", "usr/sbin"} {
		a.dir(d)
	}
	hostTools := []string{"busybox", "mke2fs", "mkfs.ext4", "e2fsck", "nbd-client", "nbdkit"}
	for _, tool := range hostTools {
		p, err := exec.LookPath(tool)
		if err != nil {
			return nil, err
		}
		if err := a.addBinary(p); err != nil {
			return nil, err
		}
	}
	plugin, err := nbdkitPlugin("file")
	if err != nil {
		return nil, err
	}
	if err := a.addBinary(plugin); err != nil {
		return nil, err
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		if err := a.addHostPath("/etc/mke2fs.conf"); err != nil {
			return nil, err
		}
	}
	for _, name := range []string{"nbdsnap", "nbdsnap-vm-guest"} {
		if name == "nbdsnap" && nbdsnapErr != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join(bin, name))
		if err != nil {
			return nil, err
		}
		a.file("usr/bin/"+name, 0o755, data)
	}
	busybox, _ := exec.LookPath("busybox")
	if err := a.busyboxApplets(busybox); err != nil {
		return nil, err
	}
	var order []string
	for _, m := range k.Modules {
		data, err := os.ReadFile(m)
		if err != nil {
			return nil, err
		}
		a.file("usr/lib/modules/guest/"+filepath.Base(m), 0o644, data)
		order = append(order, filepath.Base(m))
	}
	a.file("usr/lib/modules/guest/order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	a.file("init", 0o755, []byte(guestInit))
	a.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	a.file("etc/group", 0o644, []byte("root:x:0:\n"))
	return nbdsnapErr, a.writeFile(out)
}

// nbdkitPlugin finds a plugin's shared object through nbdkit's own
// configuration (plugindir=...).
func nbdkitPlugin(name string) (string, error) {
	out, err := exec.Command("nbdkit", "--dump-config").Output()
	if err != nil {
		return "", fmt.Errorf("nbdkit --dump-config: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if dir, ok := strings.CutPrefix(line, "plugindir="); ok {
			return filepath.Join(dir, "nbdkit-"+name+"-plugin.so"), nil
		}
	}
	return "", fmt.Errorf("nbdkit --dump-config names no plugindir")
}
