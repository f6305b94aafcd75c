package cli

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"
)

type versionOptions struct {
	clientOptions
}

func newVersionCommand(version, runDir string) *cobra.Command {
	o := &versionOptions{}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version (and a daemon's, with --name or --control)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "nbdsnap %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
			if o.control == "" && o.name == "" {
				return nil
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			v, err := c.DaemonVersion(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "daemon at %s: nbdsnap %s\n", c.Path(), v)
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	return cmd
}
