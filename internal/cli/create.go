package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
)

type createOptions struct {
	clientOptions
	backing     string
	clusterSize int64
	transient   bool
	maxSize     int64
	freeze      string
	timeout     time.Duration
	force       bool
}

// The daemon abandons a create whose instant it has not reached within
// --timeout. The client waits answerGrace longer for the daemon's answer;
// if none came (or the answer was lost: interrupt, broken connection), it
// asks the daemon what became of the create, waiting up to settleTimeout
// for any create under way to finish. Either way it reports the daemon's
// decision, never a guess.
const (
	answerGrace   = time.Second
	settleTimeout = 30 * time.Second
)

func newCreateCommand(runDir string) *cobra.Command {
	o := &createOptions{}
	cmd := &cobra.Command{
		Use:   "create [ORIGIN/]SNAP --backing PATH",
		Short: "Take a snapshot of the origin",
		Long: `Take a snapshot called SNAP of the origin ORIGIN, whose daemon is found by that
name (or --origin NAME, or --control PATH; with none of them, the only daemon
running): at the create instant the daemon stops admitting origin writes,
waits for those in flight, establishes copy-on-write and resumes. From then
on the old contents of every cluster about to be overwritten are copied to
the backing store PATH (a new file) first. The snapshot is served as the
read-only NBD export SNAP.

--freeze MOUNTPOINT freezes the filesystem mounted there (FIFREEZE) around the
create instant so that the snapshot holds a clean filesystem, and thaws it
once the daemon has answered, also when the create fails.

A block device named as --backing is used whole and refused if it holds
anything (a file system, a partition table, a RAID or LVM member, swap,
LUKS, another snapshot's store), unless --force.

The outcome printed is the daemon's: if the create instant is not reached
within --timeout (origin writes in flight, a slow origin sync), the daemon
abandons the create and nothing is created; once past the instant the
snapshot exists, even if the client was interrupted, and is reported.`,
		Example: `  nbdsnap create data/snap1 --backing /var/lib/nbdsnap-stores/data/snap1.cow
  nbdsnap create snap1 --origin data --backing /srv/snap1.cow --cluster-size 16K --freeze /mnt/data`,
		Args: oneArg("SNAP"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, args[0])
		},
	}
	f := cmd.Flags()
	o.addFlags(f, runDir)
	f.StringVar(&o.backing, "backing", "", "backing store: a file to create (must not exist) or a block device to use whole (required)")
	f.Var(sizeFlag{&o.clusterSize}, "cluster-size", "copy-on-write unit, a power of two from 4K to 1M (default 64K)")
	f.BoolVar(&o.transient, "transient", false, "never sync the backing store; the snapshot does not survive a daemon restart (faster)")
	f.Var(sizeFlag{&o.maxSize}, "max-size", "largest the backing store may grow; the snapshot turns invalid beyond it (default: no limit)")
	f.StringVar(&o.freeze, "freeze", "", "freeze the filesystem mounted at MOUNTPOINT around the create instant")
	f.DurationVar(&o.timeout, "timeout", 60*time.Second, "abandon the create if its instant is not reached by then (nothing is created)")
	f.BoolVar(&o.force, "force", false, "use a block device as --backing even if it holds data, destroying it")
	return cmd
}

// validate checks the options; clusterSizeSet says whether --cluster-size
// was given, as 0 is the default's stand-in but not a size one may ask for.
func (o *createOptions) validate(clusterSizeSet bool) error {
	if o.backing == "" {
		return usagef("create needs --backing PATH")
	}
	// The engine's limits, checked here too so that a typo is a usage error
	// before any daemon is involved.
	if cs := o.clusterSize; clusterSizeSet && (cs < cow.MinClusterSize || cs > cow.MaxClusterSize || cs&(cs-1) != 0) {
		return usagef("invalid --cluster-size %s: must be a power of two from %s to %s",
			formatSize(cs), shortSize(cow.MinClusterSize), shortSize(cow.MaxClusterSize))
	}
	if o.timeout <= 0 {
		return usagef("--timeout must be positive")
	}
	return nil
}

func (o *createOptions) run(cmd *cobra.Command, arg string) error {
	if err := o.validate(cmd.Flags().Changed("cluster-size")); err != nil {
		return err
	}
	c, name, err := o.target(arg)
	if err != nil {
		return err
	}
	backing, err := filepath.Abs(o.backing)
	if err != nil {
		return fmt.Errorf("--backing: %w", err)
	}
	req := control.CreateRequest{
		Name:          name,
		BackingPath:   backing,
		ClusterSize:   int(o.clusterSize),
		Transient:     o.transient,
		MaxSize:       o.maxSize,
		Force:         o.force,
		UUID:          uuid.NewString(),
		TimeoutMillis: o.timeout.Milliseconds(),
	}
	ctx := cmd.Context()
	var info control.SnapshotInfo
	if o.freeze != "" {
		info, err = o.createFrozen(ctx, cmd, c, req)
	} else {
		info, err = o.create(ctx, cmd, c, req)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), snapshotLine(info))
	return nil
}

// create asks the daemon for the snapshot and returns the daemon's outcome.
// If the answer is lost (the user interrupted, the connection broke), it
// asks the daemon, once any create under way has finished, whether a
// snapshot with this request's UUID exists: the create was either past its
// instant (done) or abandoned (nothing created), and says which.
func (o *createOptions) create(ctx context.Context, cmd *cobra.Command, c *control.Client, req control.CreateRequest) (control.SnapshotInfo, error) {
	rctx, cancel := context.WithTimeout(ctx, o.timeout+answerGrace)
	defer cancel()
	info, err := c.Create(rctx, req)
	if err == nil || !answerLost(err) {
		return info, err
	}
	qctx, qcancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
	defer qcancel()
	got, qerr := c.SettledSnapshot(qctx, req.Name)
	switch {
	case qerr == nil && got.UUID == req.UUID:
		fmt.Fprintf(cmd.ErrOrStderr(), "nbdsnap: the answer to the create was lost (%v), but the daemon had passed the create instant: the snapshot exists\n", err)
		return got, nil
	case qerr == nil || errors.Is(qerr, control.ErrNotFound):
		return control.SnapshotInfo{}, fmt.Errorf("create of %s abandoned before its instant (%w): nothing was created", req.Name, err)
	}
	return control.SnapshotInfo{}, fmt.Errorf("create of %s: %w; asking the daemon what became of it failed too (%v): `nbdsnap list` tells whether the snapshot exists", req.Name, err, qerr)
}

// answerLost reports whether err leaves the outcome of a request open: the
// request may have reached the daemon, whose answer did not come back. An
// answer from the daemon, or a daemon that could not be reached at all, is
// final.
func answerLost(err error) bool {
	var ce *control.Error
	return !errors.As(err, &ce) && !errors.Is(err, control.ErrNoDaemon) && !errors.Is(err, control.ErrProtocol)
}

// createFrozen freezes, creates, and thaws once the daemon's outcome is
// known (create waits for it), so the create instant, if any, fell while
// the filesystem was frozen. A thaw error is reported even when the create
// succeeded, because a frozen filesystem is the more urgent problem.
func (o *createOptions) createFrozen(ctx context.Context, cmd *cobra.Command, c *control.Client, req control.CreateRequest) (control.SnapshotInfo, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return control.SnapshotInfo{}, err
	}
	mi, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return control.SnapshotInfo{}, fmt.Errorf("--freeze: %w", err)
	}
	mountpoint, err := checkFreeze(o.freeze, mi, map[string]string{
		"backing store directory":  filepath.Dir(req.BackingPath),
		"daemon's state directory": st.StateDir,
	})
	mi.Close()
	if err != nil {
		return control.SnapshotInfo{}, err
	}
	thaw, err := freezeFS(mountpoint)
	if err != nil {
		return control.SnapshotInfo{}, err
	}
	info, cerr := o.create(ctx, cmd, c, req)
	if terr := thaw(); terr != nil {
		return control.SnapshotInfo{}, errors.Join(terr, cerr)
	}
	return info, cerr
}
