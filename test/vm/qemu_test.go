package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// boot describes one VM run.
type boot struct {
	Qemu    string
	Kernel  string // vmlinux
	Initrd  string
	Append  []string      // extra kernel parameters
	Drives  []drive       // virtio disks, in this order
	Timeout time.Duration // for the whole run
	Silence time.Duration // the longest the console may stay silent
}

// syncBuffer collects the console while QEMU writes it.
type syncBuffer struct {
	mu   sync.Mutex
	b    bytes.Buffer
	last time.Time // of the latest write
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = time.Now()
	return s.b.Write(p)
}

func (s *syncBuffer) silentFor() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Since(s.last)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// drive is a raw disk image attached as a virtio disk; the guest finds it
// by its serial number (/sys/block/vdX/serial, at most 20 characters).
// cache=unsafe: the host's copy needs no durability, only the guest's view
// of flushes matters, and the guest logs those itself.
type drive struct {
	File   string
	Serial string
}

// qemuArgs is the whole machine: TCG (the host's /dev/kvm cannot boot a
// stock kernel), one vCPU (faster than two on a 2-core host), no default
// devices and no network device at all, the serial port on stdout, and
// -no-reboot so that the guest's poweroff, and a kernel panic (panic=-1
// reboots at once), end QEMU.
func (b boot) qemuArgs() []string {
	cmdline := append([]string{"console=ttyS0", "panic=-1", "loglevel=4", "mitigations=off", "rdinit=/init"}, b.Append...)
	args := []string{
		"-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1G",
		"-nodefaults", "-nic", "none", "-nographic", "-no-reboot",
		"-serial", "stdio", "-monitor", "none",
		"-kernel", b.Kernel, "-initrd", b.Initrd,
		"-append", strings.Join(cmdline, " "),
	}
	for i, d := range b.Drives {
		id := fmt.Sprintf("disk%d", i)
		args = append(args,
			"-drive", "file="+d.File+",format=raw,if=none,cache=unsafe,id="+id,
			"-device", "virtio-blk-pci,drive="+id+",serial="+d.Serial)
	}
	return args
}

// errSilent ends a boot whose console stayed silent too long: the guest
// agent logs every step and reports a stuck one itself, so silence means
// the kernel itself is stuck.
var errSilent = errors.New("the console stayed silent")

// run boots the VM and returns its console. The error is non-nil if QEMU
// failed or was killed (timeout, silence); the console is returned in every
// case.
func (b boot) run(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, b.Timeout, fmt.Errorf("the boot ran for %v", b.Timeout))
	defer cancel()
	ctx, silenced := context.WithCancelCause(ctx)
	defer silenced(nil)
	console := &syncBuffer{last: time.Now()}
	go func() {
		for ctx.Err() == nil {
			if d := console.silentFor(); d > b.Silence {
				silenced(fmt.Errorf("%w for %v", errSilent, d.Round(time.Second)))
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	cmd := exec.CommandContext(ctx, b.Qemu, b.qemuArgs()...)
	cmd.Stdin = nil // /dev/null: nothing types on the console
	cmd.Stdout = console
	cmd.Stderr = console
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		return console.String(), fmt.Errorf("qemu killed: %w", context.Cause(ctx))
	}
	if err != nil {
		return console.String(), fmt.Errorf("qemu: %w", err)
	}
	return console.String(), nil
}
