package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

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
}

func newCreateCommand(runDir string) *cobra.Command {
	o := &createOptions{}
	cmd := &cobra.Command{
		Use:   "create SNAP --backing PATH",
		Short: "Take a snapshot of the origin",
		Long: `Take a snapshot called SNAP: at the create instant the daemon stops admitting
origin writes, waits for those in flight, establishes copy-on-write and resumes.
From then on the old contents of every cluster about to be overwritten are
copied to the backing store PATH (a new file) first. The snapshot is served as
the read-only NBD export SNAP.

--freeze MOUNTPOINT freezes the filesystem mounted there (FIFREEZE) around the
create instant so that the snapshot holds a clean filesystem, and thaws it
afterwards, also when the create fails.`,
		Example: `  nbdsnap create snap1 --name data --backing /var/lib/nbdsnap/snap1.cow
  nbdsnap create snap1 --name data --backing /srv/snap1.cow --cluster-size 16K --freeze /mnt/data`,
		Args: cobra.ExactArgs(1),
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
	f.DurationVar(&o.timeout, "timeout", 60*time.Second, "give up (and thaw) if the daemon has not answered by then")
	return cmd
}

func (o *createOptions) validate() error {
	if o.backing == "" {
		return usagef("create needs --backing PATH")
	}
	// The engine's limits, checked here too so that a typo is a usage error
	// before any daemon is involved.
	if cs := o.clusterSize; cs != 0 && (cs < cow.MinClusterSize || cs > cow.MaxClusterSize || cs&(cs-1) != 0) {
		return usagef("invalid --cluster-size %s: must be a power of two from %s to %s",
			formatSize(cs), shortSize(cow.MinClusterSize), shortSize(cow.MaxClusterSize))
	}
	if o.timeout <= 0 {
		return usagef("--timeout must be positive")
	}
	return nil
}

func (o *createOptions) run(cmd *cobra.Command, name string) error {
	if err := o.validate(); err != nil {
		return err
	}
	backing, err := filepath.Abs(o.backing)
	if err != nil {
		return fmt.Errorf("--backing: %w", err)
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	req := control.CreateRequest{
		Name:        name,
		BackingPath: backing,
		ClusterSize: int(o.clusterSize),
		Transient:   o.transient,
		MaxSize:     o.maxSize,
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
	defer cancel()

	var info control.SnapshotInfo
	if o.freeze != "" {
		info, err = o.createFrozen(ctx, c, req)
	} else {
		info, err = c.Create(ctx, req)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), snapshotLine(info))
	return nil
}

// createFrozen freezes, creates, and thaws whatever happened; a thaw error
// is reported even when the create succeeded, because a frozen filesystem is
// the more urgent problem.
func (o *createOptions) createFrozen(ctx context.Context, c *control.Client, req control.CreateRequest) (control.SnapshotInfo, error) {
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
	info, cerr := c.Create(ctx, req)
	if terr := thaw(); terr != nil {
		return control.SnapshotInfo{}, errors.Join(terr, cerr)
	}
	return info, cerr
}
