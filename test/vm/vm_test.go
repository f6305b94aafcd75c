package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// scenarios run in this order. One boot runs them one after the other;
// the first failure ends that boot, and the next boot starts with the
// scenario after it, so a failed or hung scenario costs only itself and
// every scenario starts from a VM the previous ones left clean (the agent
// checks). The guest agent (test/vm/guest) implements them.
var scenarios = []string{
	"reference",   // the harness itself, against nbdkit: attach, ext4, kill -9 + reconnect
	"freeze",      // scenario 1: create --freeze, snapshot == set A exactly
	"nofreeze",    // scenario 2: sync + create, snapshot mounts ro,noload
	"crash",       // scenario 3: kill -9 during a write load, restart, reconnect
	"full",        // scenario 4: backing store too small, snapshot invalid, origin fine
	"readonly",    // scenario 5: the snapshot device is read-only to the kernel
	"tls",         // the kernel client over TCP with TLS: client certificates, allow-lists, plain TCP refused
	"incremental", // full dd of s1, then only the ranges `nbdsnap diff s1 s2` lists: equals s2, e2fsck clean
	"rollback",    // refused while attached; umount, detach, rollback s1 --wait: set A exactly; again with --consume
	"heldwrites",  // kill -9 with held writes: replayed at the restart, nothing answered lost
}

// A boot may last bootTimeout per scenario it runs, and its console may stay
// silent for at most consoleSilence: both longer than the guest agent's
// deadline for one scenario (which reports a stuck step itself), so that
// they catch only a stuck kernel.
const (
	bootTimeout    = 4 * time.Minute
	consoleSilence = 4 * time.Minute
)

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
		t.Skip("boots a VM for minutes; not under -short")
	}
	qemu := testenv.RequireTool(t, "qemu-system-x86_64")
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "xz", "ldd", "busybox", "mke2fs", "e2fsck", "nbd-client", "nbdkit", "dmsetup", "wipefs", "go"} {
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

	remaining, err := selectScenarios(os.Getenv("NBDSNAP_VM_SCENARIOS"))
	if err != nil {
		t.Fatal(err)
	}
	if nbdsnapErr != nil {
		// Only the reference scenario can run without nbdsnap.
		var reference []string
		for _, name := range remaining {
			if name == "reference" {
				reference = append(reference, name)
				continue
			}
			t.Run(name, func(t *testing.T) { t.Fatalf("no nbdsnap binary for the guest: %v", nbdsnapErr) })
		}
		remaining = reference
	}
	for len(remaining) > 0 {
		b := boot{Qemu: qemu, Kernel: k.Vmlinux, Initrd: initrd,
			Timeout: bootTimeout * time.Duration(len(remaining)), Silence: consoleSilence,
			Append: []string{report.CmdlineKey + "=" + strings.Join(remaining, ",")}}
		began := time.Now()
		console, bootErr := b.run(context.Background())
		t.Logf("boot for %s: %.1fs", strings.Join(remaining, ","), time.Since(began).Seconds())
		if dir := os.Getenv("NBDSNAP_VM_LOGS"); dir != "" {
			if err := os.WriteFile(filepath.Join(dir, remaining[0]+".console"), []byte(console), 0o644); err != nil {
				t.Errorf("keep the console: %v", err)
			}
		}
		results := map[string]report.Result{}
		for _, r := range report.Parse(console) {
			results[r.Scenario] = r
		}
		ran := 0
		for _, name := range remaining {
			r, ok := results[name]
			ran++
			t.Run(name, func(t *testing.T) { judge(t, name, r, ok, console, bootErr) })
			if !ok || !r.OK {
				break
			}
		}
		remaining = remaining[ran:]
	}
}

// selectScenarios returns the scenarios named in a comma-separated list
// ($NBDSNAP_VM_SCENARIOS, for working on one of them), in the suite's order;
// all of them if the list is empty. (-run cannot select: one boot runs
// several scenarios.)
func selectScenarios(list string) ([]string, error) {
	if list == "" {
		return scenarios, nil
	}
	want := map[string]bool{}
	for _, name := range strings.Split(list, ",") {
		if !slices.Contains(scenarios, name) {
			return nil, fmt.Errorf("NBDSNAP_VM_SCENARIOS: unknown scenario %q (have %s)", name, strings.Join(scenarios, ", "))
		}
		want[name] = true
	}
	var out []string
	for _, name := range scenarios {
		if want[name] {
			out = append(out, name)
		}
	}
	return out, nil
}

// judge turns one scenario's outcome into a subtest's: it fails unless the
// scenario's result line says it passed, and then shows the scenario's part
// of the console (the whole console if the scenario never began).
func judge(t *testing.T, name string, r report.Result, ok bool, console string, bootErr error) {
	var steps []string
	for _, s := range r.Steps {
		steps = append(steps, fmt.Sprintf("%s %.1fs", s.Name, s.Seconds))
	}
	if ok && r.OK {
		t.Logf("scenario %s: %.1fs; steps: %s", name, r.Seconds, strings.Join(steps, ", "))
		return
	}
	section := report.Section(console, name)
	if section == "" {
		section = console
	}
	t.Logf("guest console (scenario %s):\n%s", name, section)
	switch {
	case ok:
		t.Errorf("scenario %s failed after %.1fs: %s\nsteps: %s", name, r.Seconds, r.Error, strings.Join(steps, ", "))
	case bootErr != nil:
		t.Errorf("scenario %s: no result: %v", name, bootErr)
	default:
		t.Errorf("scenario %s: no result line on the console", name)
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
	hostTools := []string{"busybox", "mke2fs", "mkfs.ext4", "e2fsck", "nbd-client", "nbdkit", "dmsetup", "wipefs"}
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
