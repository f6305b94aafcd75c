package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// guestModules are the modules the guest loads, each with its dependencies:
// the NBD driver and ext4, and for the power-loss test virtio disks and
// dm-log-writes (all modules in Debian's kernel).
var guestModules = []string{"nbd", "ext4", "virtio_pci", "virtio_blk", "dm-log-writes"}

// kernel is a prepared guest kernel: an uncompressed vmlinux and the
// modules the guest loads, in load order.
type kernel struct {
	Dir     string   // the cache directory holding it
	Vmlinux string   // path of the ELF kernel
	Modules []string // paths of the .ko files, dependencies first
	Package string   // e.g. linux-image-6.1.0-56-amd64_6.1.192-2
}

// cacheRoot is where prepared kernels are kept between runs, outside the
// repository.
func cacheRoot() (string, error) {
	if d := os.Getenv("NBDSNAP_VM_CACHE"); d != "" {
		return d, nil
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "nbdsnap-vm"), nil
	}
	return "/var/cache/nbdsnap-vm", nil
}

// kernelPackage names the Debian kernel package and its candidate version:
// $NBDSNAP_VM_KERNEL_PACKAGE if set, else what the linux-image-amd64
// metapackage depends on (linux-image-6.1.0-N-amd64 on bookworm).
func kernelPackage() (name, version string, err error) {
	name = os.Getenv("NBDSNAP_VM_KERNEL_PACKAGE")
	if name == "" {
		out, err := exec.Command("apt-cache", "depends", "linux-image-amd64").CombinedOutput()
		if err != nil {
			return "", "", fmt.Errorf("apt-cache depends linux-image-amd64 (are the apt lists there? apt-get update): %w\n%s", err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				name = f[1]
				break
			}
		}
		if name == "" {
			return "", "", fmt.Errorf("apt-cache depends linux-image-amd64 names no linux-image package:\n%s", out)
		}
	}
	out, err := exec.Command("apt-cache", "show", "--no-all-versions", name).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %w\n%s", name, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return name, strings.TrimSpace(v), nil
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s: no Version field", name)
}

// prepareKernel returns the cached kernel for the current package version,
// preparing it first if needed. Preparation happens in a private directory
// renamed into place at the end, so an interrupted or concurrent run never
// leaves a half-prepared kernel behind.
func prepareKernel(logf func(string, ...any)) (*kernel, error) {
	root, err := cacheRoot()
	if err != nil {
		return nil, err
	}
	name, version, err := kernelPackage()
	if err != nil {
		// Offline, or apt's lists are gone: a kernel prepared by an earlier
		// run serves as well as the newest.
		if k, cerr := newestCachedKernel(root); cerr == nil {
			logf("%v; using the cached %s", err, k.Package)
			return k, nil
		}
		return nil, err
	}
	// The key names what the directory holds: the package version and the
	// modules taken from it.
	key := name + "_" + strings.ReplaceAll(version, ":", "%3a") + "_" + strings.Join(guestModules, "+")
	dir := filepath.Join(root, key)
	if k, err := loadKernel(dir, key); err == nil {
		return k, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(root, ".prepare-")
	if err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	logf("preparing %s %s in %s (once; cached afterwards)", name, version, dir)
	if err := buildKernelDir(tmp, name, version); err != nil {
		return nil, err
	}
	if err := os.Rename(filepath.Join(tmp, "out"), dir); err != nil {
		// Another run may have won the race; its result is as good.
		if k, lerr := loadKernel(dir, key); lerr == nil {
			return k, nil
		}
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	return loadKernel(dir, key)
}

// newestCachedKernel loads the cached kernel whose directory name sorts
// last (the highest ABI number, as long as they have the same digit count).
func newestCachedKernel(root string) (*kernel, error) {
	dirs, _ := filepath.Glob(filepath.Join(root, "linux-image-*_"+strings.Join(guestModules, "+")))
	for i := len(dirs) - 1; i >= 0; i-- {
		if k, err := loadKernel(dirs[i], filepath.Base(dirs[i])); err == nil {
			return k, nil
		}
	}
	return nil, fmt.Errorf("no prepared kernel in %s", root)
}

// loadKernel reads a prepared kernel directory: vmlinux, modules/ and
// modules/order (one file name a line, in load order).
func loadKernel(dir, key string) (*kernel, error) {
	order, err := os.ReadFile(filepath.Join(dir, "modules", "order"))
	if err != nil {
		return nil, err
	}
	k := &kernel{Dir: dir, Vmlinux: filepath.Join(dir, "vmlinux"), Package: key}
	if _, err := os.Stat(k.Vmlinux); err != nil {
		return nil, err
	}
	for _, m := range strings.Fields(string(order)) {
		k.Modules = append(k.Modules, filepath.Join(dir, "modules", m))
	}
	return k, nil
}

func run(dir string, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return out, nil
}

// buildKernelDir downloads and unpacks the package in tmp and leaves the
// prepared kernel in tmp/out.
func buildKernelDir(tmp, name, version string) error {
	if _, err := run(tmp, "apt-get", "download", "-q", name+"="+version); err != nil {
		return err
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s: expected one .deb, found %v", name, debs)
	}
	x := filepath.Join(tmp, "x")
	if _, err := run(tmp, "dpkg-deb", "-x", debs[0], x); err != nil {
		return err
	}
	releases, _ := filepath.Glob(filepath.Join(x, "lib", "modules", "*"))
	if len(releases) != 1 {
		return fmt.Errorf("%s: expected one lib/modules/<release>, found %v", name, releases)
	}
	release := filepath.Base(releases[0])
	// The package ships no modules.dep (the postinst makes it); make it in
	// the unpacked tree only.
	if _, err := run(tmp, "depmod", "-b", x, release); err != nil {
		return err
	}
	out := filepath.Join(tmp, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return err
	}
	bz, err := os.ReadFile(filepath.Join(x, "boot", "vmlinuz-"+release))
	if err != nil {
		return err
	}
	elf, err := extractVmlinux(bz)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := os.WriteFile(filepath.Join(out, "vmlinux"), elf, 0o644); err != nil {
		return err
	}
	var order []string
	seen := map[string]bool{}
	for _, m := range guestModules {
		// -C /dev/null: the host's modprobe.d options are not the guest's.
		dep, err := run(tmp, "modprobe", "-C", "/dev/null", "--show-depends", "-d", x, "-S", release, m)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(dep), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "insmod" {
				continue // "builtin x": nothing to load
			}
			base := filepath.Base(f[1])
			if seen[base] {
				continue
			}
			seen[base] = true
			data, err := os.ReadFile(f[1])
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(out, "modules", base), data, 0o644); err != nil {
				return err
			}
			order = append(order, base)
		}
	}
	return os.WriteFile(filepath.Join(out, "modules", "order"), []byte(strings.Join(order, "\n")+"\n"), 0o644)
}

// extractVmlinux returns the ELF kernel inside an x86 bzImage. The boot
// protocol header (2.08+) says where the compressed payload lies:
// payload_offset (0x248) counts from the start of the protected-mode code,
// which follows the (setup_sects+1) 512-byte sectors of real-mode setup
// (setup_sects at 0x1f1, 0 meaning 4). The payload's magic names the
// compressor; the kernel's build appends the uncompressed size after the
// stream, which the decompressors are told to ignore.
func extractVmlinux(bz []byte) ([]byte, error) {
	if len(bz) < 0x250 || string(bz[0x202:0x206]) != "HdrS" {
		return nil, errors.New("vmlinuz: no bzImage boot header")
	}
	if v := binary.LittleEndian.Uint16(bz[0x206:]); v < 0x208 {
		return nil, fmt.Errorf("vmlinuz: boot protocol %#x predates payload_offset", v)
	}
	setup := int(bz[0x1f1])
	if setup == 0 {
		setup = 4
	}
	off := (setup+1)*512 + int(binary.LittleEndian.Uint32(bz[0x248:]))
	n := int(binary.LittleEndian.Uint32(bz[0x24c:]))
	if off < 0 || n <= 0 || off+n > len(bz) {
		return nil, fmt.Errorf("vmlinuz: payload [%d, +%d) outside the %d-byte image", off, n, len(bz))
	}
	payload := bz[off : off+n]
	var elf []byte
	var err error
	switch {
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			zr.Multistream(false)
			elf, err = io.ReadAll(bufio.NewReader(zr))
		}
	case bytes.HasPrefix(payload, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		elf, err = filter(payload, "xz", "-dc", "--single-stream")
	case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		elf, err = filter(payload[:len(payload)-4], "zstd", "-dc")
	default:
		return nil, fmt.Errorf("vmlinuz: payload compression %x not handled (gzip, xz, zstd are)", payload[:min(6, len(payload))])
	}
	if err != nil {
		return nil, fmt.Errorf("vmlinuz: decompress: %w", err)
	}
	if !bytes.HasPrefix(elf, []byte("\x7fELF")) {
		return nil, errors.New("vmlinuz: the decompressed payload is not an ELF file")
	}
	return elf, nil
}

func filter(in []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", name, err, stderr.Bytes())
	}
	return out, nil
}
