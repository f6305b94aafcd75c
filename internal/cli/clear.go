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
		Use:   "clear SNAP",
		Short: "Delete a snapshot and its backing store",
		Long: `Delete snapshot SNAP: drop its NBD export, stop its copy-on-write and remove its
backing store file. Refused while an NBD client has the snapshot open (fss
answers EBUSY), unless --force, which disconnects such clients first.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.Clear(cmd.Context(), args[0], o.force); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: cleared\n", args[0])
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.force, "force", false, "disconnect NBD clients of the snapshot instead of refusing")
	return cmd
}
