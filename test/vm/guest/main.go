// Command nbdsnap-vm-guest is the agent test/vm puts in the VM's initramfs.
// /init starts it after loading nbd.ko and ext4.ko; it reads the scenarios
// named by nbdsnapvm=<name>,<name>... on the kernel command line and runs
// them in order, printing a begin line and a result line (test/vm/report) for
// each on the console, where the host test reads them; it stops at the first
// failure. Every step is logged and timed on the console too, so a failure comes
// with its context.
//
// The scenarios drive the real user path: `nbdsnap serve` on an origin image
// in the guest's tmpfs, the kernel NBD driver attached with nbd-client over
// a unix socket (tls: over TCP on the loopback), ext4 made and mounted on
// /dev/nbd0, `nbdsnap create`, the snapshot attached as /dev/nbd1. Each
// scenario asserts; none only prints.
//
//   - reference: the same client path against nbdkit, including a kill -9
//     of the server under a write load and the reconnection, so that a
//     failure elsewhere is nbdsnap's and not the harness's.
//   - freeze: create --freeze under a mounted ext4; the snapshot passes
//     e2fsck -fn and holds file set A exactly, nothing of set B.
//   - nofreeze: sync, then create without freezing; the snapshot mounts
//     ro,noload and e2fsck -fn finds nothing beyond what any capture of a
//     mounted ext4 shows (journal recovery skipped, superblock free totals).
//   - crash: kill -9 of the daemon during a write load, restart with the same
//     state directory, reconnect the kernel; the persistent snapshot is
//     byte-identical to the origin at the create instant, the origin clean.
//   - full: a backing store too small; the snapshot turns invalid with a
//     reason, the origin's writes all land and the kernel logs no I/O error.
//   - readonly: the snapshot device is read-only to the kernel, and writes
//     fail cleanly both through the kernel and on the wire.
//   - tls: the kernel attached over TCP with TLS (nbd-client -certfile
//     -keyfile -cacertfile; certificates made by the agent): the origin with
//     the client certificate its allow-list names, the snapshot (set A
//     exactly, e2fsck -fn clean) with the snapshots' one; the other
//     certificate on the origin and plain TCP are refused, leaving the
//     device unattached and the daemon serving; each detach ends the TLS
//     relay process nbd-client leaves running.
//   - incremental: an incremental backup with dd: s1 (create --freeze)
//     copied whole from /dev/nbd1, files changed, s2; the ranges `nbdsnap
//     diff s1 s2 --json` lists copied from s2 (/dev/nbd1, -readonly) into
//     the copy make it equal a full copy of s2 (cmp), and e2fsck -fn finds
//     it clean.
//   - rollback: `nbdsnap rollback` with the kernel client: ext4 with set A,
//     s1 (create --freeze, its image kept with dd), set B; the rollback is
//     refused (exit status 1, "detach") while /dev/nbd0 is attached, mounted
//     or not; after umount and detach, `rollback s1 --wait` makes the origin
//     image equal s1's (cmp) and the status say done, and /dev/nbd0 attached
//     again passes e2fsck -fn and holds set A exactly. s1 is kept: after more
//     changes, `rollback s1 --wait --consume` brings set A back again and
//     clears s1 (gone from the list, its backing store removed).
//   - heldwrites: held writes across a kill -9 of the daemon, snap1's store
//     on a block device nbdkit serves (/dev/nbd2: its sync is slow enough
//     for the daemon to hold writes, and the scenario can stop it): a
//     synced burst (the daemon must have held some of its writes), unsynced
//     files, then O_DIRECT overwrites with the store stopped (answered,
//     never flushed, all first writes still held) and the kill; after
//     detach, lazy umount and a restart, which replays the held writes, the
//     origin passes e2fsck -fn once its journal is replayed and holds every
//     synced file and every answered write exactly, and the snapshot is
//     byte-identical to the create instant and passes e2fsck -fn.
//
// Reconnecting: Debian 12's nbd-client (3.24) attaches through netlink and
// exits; it cannot reconnect such a device (in 3.24 -persist is handled only
// on the ioctl path; netlink reconnection arrived in nbd 3.27). The agent
// does what that newer nbd-client does: it sets a dead-connection timeout
// with NBD_CMD_RECONFIGURE, so that the kernel holds I/O while the server
// is down, and hands the kernel a freshly negotiated socket with another
// NBD_CMD_RECONFIGURE.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// scenarioDeadline is shorter than the host's boot timeout so that a stuck
// step is reported as such rather than as a killed VM. A step blocked in
// the kernel (a process in uninterruptible sleep ignores the context) is
// reported stuck a little later, and the agent exits without it.
// The power-loss scenario runs several recordings and has a deadline of
// its own, as the host's boot for it has.
const (
	scenarioDeadline  = 200 * time.Second
	powerLossDeadline = 600 * time.Second
	stuckGrace        = 15 * time.Second
)

var scenarios = map[string]func(context.Context, *guest) error{
	"reference":   scenarioReference,
	"freeze":      scenarioFreeze,
	"nofreeze":    scenarioNoFreeze,
	"crash":       scenarioCrash,
	"full":        scenarioFull,
	"readonly":    scenarioReadOnly,
	"tls":         scenarioTLS,
	"incremental": scenarioIncremental,
	"rollback":    scenarioRollback,
	"heldwrites":  scenarioHeldWrites,
	"powerloss":   scenarioPowerLoss,
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelDebug}))
	names, err := scenarioNames()
	if err != nil {
		log.Error("no scenario", "err", err)
		os.Stdout.WriteString("\n" + report.Result{Error: err.Error()}.Line() + "\n")
		return
	}
	// One scenario after the other in this boot, each starting from what
	// the previous one, having passed, left: nothing. The first failure
	// ends the boot; the host boots again for the scenarios after it.
	for _, name := range names {
		// Each line in one write, so that a kernel message cannot split it.
		os.Stdout.WriteString("\n" + report.BeginPrefix + name + "\n")
		r := report.Result{Scenario: name}
		start := time.Now()
		r.Steps, err = runScenario(log, name)
		r.Seconds = time.Since(start).Seconds()
		r.OK = err == nil
		if err != nil {
			r.Error = err.Error()
			log.Error("scenario failed", "scenario", name, "err", err)
		}
		os.Stdout.WriteString("\n" + r.Line() + "\n")
		if !r.OK {
			return
		}
	}
}

func scenarioNames() ([]string, error) {
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil, fmt.Errorf("read /proc/cmdline: %w", err)
	}
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, report.CmdlineKey+"="); ok {
			return strings.Split(v, ","), nil
		}
	}
	return nil, fmt.Errorf("no %s= on the kernel command line", report.CmdlineKey)
}

func runScenario(log *slog.Logger, name string) ([]report.Step, error) {
	fn, ok := scenarios[name]
	if !ok {
		return nil, fmt.Errorf("unknown scenario %q", name)
	}
	deadline := scenarioDeadline
	if name == "powerloss" {
		deadline = powerLossDeadline
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	g := &guest{log: log.With("scenario", name)}
	if err := g.step("fresh start", func() error { return freshStart(ctx, g) }); err != nil {
		steps, _ := g.progress()
		return steps, err
	}
	done := make(chan error, 1)
	go func() { done <- fn(ctx, g) }()
	select {
	case err := <-done:
		steps, _ := g.progress()
		return steps, err
	case <-time.After(deadline + stuckGrace):
		steps, current := g.progress()
		return steps, fmt.Errorf("stuck in step %q past the %v deadline", current, deadline)
	}
}
