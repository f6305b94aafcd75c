package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

type listOptions struct {
	clientOptions
	json bool
}

func newListCommand(runDir string) *cobra.Command {
	o := &listOptions{}
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List the snapshots, one line each",
		Example: `  nbdsnap list --origin data --json`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, _, err := o.target("")
			if err != nil {
				return err
			}
			snaps, err := c.Snapshots(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.json {
				return writeJSON(out, snaps)
			}
			for _, s := range snaps {
				fmt.Fprintln(out, snapshotLine(s))
			}
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.json, "json", false, "print a JSON array")
	return cmd
}
