package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

type rollbackOptions struct {
	clientOptions
	force   bool
	wait    bool
	consume bool
	json    bool
	rate    int64
}

func newRollbackCommand(runDir string) *cobra.Command {
	o := &rollbackOptions{}
	cmd := &cobra.Command{
		Use:   "rollback [ORIGIN/]SNAP",
		Short: "Put a snapshot's content back onto its origin, online",
		Long: `Roll the origin back to snapshot SNAP: when the command returns, every read of
the origin export returns SNAP's content, while the daemon copies the blocks
SNAP preserved back onto the origin in the background. Writes to the origin
during the copy land on top of SNAP's content, and other snapshots stay exact
(the copy goes through copy-on-write like any write).

The rollback is crash-safe: its progress is recorded in the state directory,
and a restart resumes it before the origin is served again. A daemon that
cannot reopen SNAP's store then does not start, rather than serve a mix of old
and restored blocks.

Refused while NBD clients have the origin export open, because their caches
(a mounted file system's above all) would still hold the content the rollback
replaces: unmount, detach (nbd-client -d /dev/nbdX), roll back, attach and
mount again. --force rolls back anyway.

SNAP is kept, so a rollback can be repeated; --consume clears it once the
copy is complete (as lvconvert --merge does). While the rollback runs, no
snapshot can be created and SNAP cannot be cleared. A transient, invalid or
bookmarked snapshot cannot be rolled back to.

--wait blocks until the copy is complete, with a progress bar on a terminal
and a line every 10% (or every 5 seconds) otherwise; "nbdsnap status" shows
the same. --json prints the rollback's state as JSON (one object per update
with --wait). --rate bounds the background copy (e.g. 50M per second);
writes to blocks not yet copied back are served at once regardless.`,
		Example: `  nbdsnap rollback data/before-upgrade --wait
  nbdsnap rollback before-upgrade --origin data --consume --rate 100M
  nbdsnap rollback data/s1 --wait --json`,
		Args: oneArg("SNAP"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, snap, err := o.target(args[0])
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			st, err := c.Rollback(ctx, snap, control.RollbackRequest{Force: o.force, Consume: o.consume, Rate: o.rate})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.json {
				if err := writeJSONLine(out, st); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "%s: rollback started: the origin shows %s now; %s to copy back\n", snap, snap, formatSize(st.TotalBytes))
			}
			if !o.wait {
				return nil
			}
			var show func(control.RollbackStatus)
			switch {
			case o.json:
				show = func(s control.RollbackStatus) { writeJSONLine(out, s) }
			case isTerminal(cmd.ErrOrStderr()):
				show = progressBar(cmd.ErrOrStderr(), time.Now)
			default:
				show = progressLines(cmd.ErrOrStderr(), time.Now)
			}
			final, err := waitRollback(ctx, c, st, 50*time.Millisecond, show)
			if err != nil {
				return err
			}
			if !o.json {
				what := "complete"
				if final.Consume {
					what += ", " + snap + " cleared"
				}
				fmt.Fprintf(out, "%s: rollback %s\n", snap, what)
			}
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.force, "force", false, "roll back although NBD clients have the origin open (their caches go stale)")
	cmd.Flags().BoolVar(&o.wait, "wait", false, "wait until the copy back is complete, showing progress")
	cmd.Flags().BoolVar(&o.consume, "consume", false, "clear the snapshot once the rollback is complete")
	cmd.Flags().BoolVar(&o.json, "json", false, "print the rollback's state as JSON")
	cmd.Flags().Var(sizeFlag{&o.rate}, "rate", "bound the background copy to this many bytes per second (default: no bound)")
	return cmd
}

// waitRollback polls the daemon until the rollback that started as st is
// done, calling show with every state it sees; it fails when the
// rollback failed or another replaced it.
func waitRollback(ctx context.Context, c *control.Client, st control.RollbackStatus, every time.Duration,
	show func(control.RollbackStatus)) (control.RollbackStatus, error) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		show(st)
		switch st.State {
		case control.RollbackDone:
			return st, nil
		case control.RollbackFailed:
			return st, fmt.Errorf("rollback to %s failed: %s; the origin shows %s where the copy failed, and a restart of the daemon tries again", st.Snapshot, st.Error, st.Snapshot)
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("stopped waiting (%w); the rollback to %s goes on in the daemon: nbdsnap status shows it", ctx.Err(), st.Snapshot)
		case <-t.C:
		}
		now, err := c.Status(ctx)
		if err != nil {
			return st, fmt.Errorf("waiting for the rollback to %s: %w (it goes on in the daemon: nbdsnap status shows it)", st.Snapshot, err)
		}
		if now.Rollback == nil || now.Rollback.UUID != st.UUID || !now.Rollback.Started.Equal(st.Started) {
			return st, fmt.Errorf("the rollback to %s is no longer known to the daemon (was it restarted? nbdsnap status shows what it does)", st.Snapshot)
		}
		st = *now.Rollback
	}
}

func writeJSONLine(w io.Writer, v any) error { return json.NewEncoder(w).Encode(v) }

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// rollbackLine describes a rollback for status and the progress output.
func rollbackLine(st control.RollbackStatus) string {
	done := st.TotalBytes - st.RemainingBytes
	s := fmt.Sprintf("rollback to %s: %s, %s of %s copied back (%d%%)", st.Snapshot, st.State,
		formatSize(done), formatSize(st.TotalBytes), percent(done, st.TotalBytes))
	if st.Consume {
		s += ", consume"
	}
	if st.Rate > 0 {
		s += ", at most " + formatSize(st.Rate) + "/s"
	}
	if st.Error != "" {
		s += ": " + st.Error
	}
	return s
}

func percent(done, total int64) int64 {
	if total == 0 {
		return 100
	}
	return done * 100 / total
}

// progressLines writes a rollbackLine at each tenth of the copy and at
// least every 5 seconds between, for logs.
func progressLines(w io.Writer, now func() time.Time) func(control.RollbackStatus) {
	const every = 5 * time.Second
	last, step := now(), int64(-1)
	return func(st control.RollbackStatus) {
		s := percent(st.TotalBytes-st.RemainingBytes, st.TotalBytes) / 10
		if s == step && now().Sub(last) < every && st.State == control.RollbackRunning {
			return
		}
		step, last = s, now()
		fmt.Fprintln(w, rollbackLine(st))
	}
}

// progressBar redraws one line on a terminal: a bar, the percentage, what
// is left and the rate since the start.
func progressBar(w io.Writer, now func() time.Time) func(control.RollbackStatus) {
	const width = 30
	start := now()
	first := int64(-1)
	return func(st control.RollbackStatus) {
		done := st.TotalBytes - st.RemainingBytes
		if first < 0 {
			first = done
		}
		p := percent(done, st.TotalBytes)
		fill := int(p * width / 100)
		rate := ""
		if secs := now().Sub(start).Seconds(); secs > 0.5 {
			rate = ", " + formatSize(int64(float64(done-first)/secs)) + "/s"
		}
		fmt.Fprintf(w, "\r\033[Krollback to %s [%s%s] %3d%% %s left%s", st.Snapshot,
			strings.Repeat("#", fill), strings.Repeat(".", width-fill), p, formatSize(st.RemainingBytes), rate)
		if st.State != control.RollbackRunning {
			fmt.Fprintln(w)
		}
	}
}
