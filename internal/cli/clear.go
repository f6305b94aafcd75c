package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

type clearOptions struct {
	clientOptions
	force    bool
	bookmark bool
}

func newClearCommand(runDir string) *cobra.Command {
	o := &clearOptions{}
	cmd := &cobra.Command{
		Use:   "clear [ORIGIN/]SNAP",
		Short: "Delete a snapshot and its backing store",
		Long: `Delete snapshot SNAP: drop its NBD export, stop its copy-on-write and remove its
backing store. Refused while an NBD client has the snapshot open (fss
answers EBUSY), unless --force, which disconnects such clients first.

Only the snapshot's own store is touched, as its header proves: a backing
file is deleted, a backing block device has its header wiped (the device
itself stays). Anything else found at the backing path is left in place,
and the output says so.

With --bookmark the snapshot's image and export go and its store's data is
freed, but a small bookmark stays: the store's map of which blocks the origin
wrote since the snapshot was taken, kept up to date (and crash-safe) like a
snapshot's. Snapshots taken later can then still report the changes since it
("nbdsnap diff SNAP LATER", the qemu:dirty-bitmap:SNAP context of LATER's
export), so an incremental backup against SNAP keeps working without keeping
its data. A bookmark costs what the snapshot cost on first writes (a commit
before the origin write), without the copy. "nbdsnap clear SNAP" without
--bookmark deletes a bookmark.`,
		Example: `  nbdsnap clear data/snap1
  nbdsnap clear snap1 --origin data --force
  nbdsnap clear data/monday --bookmark`,
		Args: oneArg("SNAP"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, snap, err := o.target(args[0])
			if err != nil {
				return err
			}
			if o.bookmark {
				if _, err := c.Bookmark(cmd.Context(), snap, o.force); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: image cleared, kept as a bookmark\n", snap)
				return nil
			}
			res, err := c.Clear(cmd.Context(), snap, o.force)
			if err != nil {
				return err
			}
			if res.Kept != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: cleared; %s\n", snap, res.Kept)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: cleared\n", snap)
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.force, "force", false, "disconnect NBD clients of the snapshot instead of refusing")
	cmd.Flags().BoolVar(&o.bookmark, "bookmark", false, "drop the image but keep a bookmark that later snapshots can report changes against")
	return cmd
}
