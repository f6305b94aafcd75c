package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

type clearOptions struct {
	clientOptions
	force bool
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
and the output says so.`,
		Example: `  nbdsnap clear data/snap1
  nbdsnap clear snap1 --origin data --force`,
		Args: oneArg("SNAP"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, snap, err := o.target(args[0])
			if err != nil {
				return err
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
	return cmd
}
