package cli

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

type statusOptions struct {
	clientOptions
	json bool
}

func newStatusCommand(runDir string) *cobra.Command {
	o := &statusOptions{}
	cmd := &cobra.Command{
		Use:   "status [[ORIGIN/]SNAP]",
		Short: "Show the daemon and its snapshots, or one snapshot",
		Long: `Without SNAP: one line about the daemon, then one per snapshot. With SNAP: that
snapshot's line. The daemon's line ends with its version. --json prints the full
record, engine statistics included.`,
		Example: `  nbdsnap status --origin data
  nbdsnap status data/snap1 --json`,
		Args: optionalArg("SNAP"),
		RunE: func(cmd *cobra.Command, args []string) error {
			arg := ""
			if len(args) == 1 {
				arg = args[0]
			}
			c, snap, err := o.target(arg)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(args) == 1 {
				info, err := c.Snapshot(cmd.Context(), snap)
				if err != nil {
					return err
				}
				if o.json {
					return writeJSON(out, info)
				}
				fmt.Fprintln(out, snapshotLine(info))
				return nil
			}
			st, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			if o.json {
				return writeJSON(out, st)
			}
			fmt.Fprintln(out, daemonLine(st))
			if st.Rollback != nil {
				fmt.Fprintln(out, rollbackLine(*st.Rollback))
			}
			for _, s := range st.Snapshots {
				fmt.Fprintln(out, snapshotLine(s))
			}
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.json, "json", false, "print JSON")
	return cmd
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
