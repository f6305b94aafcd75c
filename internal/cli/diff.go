package cli

import (
	"fmt"

	"github.com/spf13/cobra"
)

type diffOptions struct {
	clientOptions
	json bool
}

func newDiffCommand(runDir string) *cobra.Command {
	o := &diffOptions{}
	cmd := &cobra.Command{
		Use:   "diff [ORIGIN/]BASE [SNAP]",
		Short: "List the blocks changed between two snapshots, or since one",
		Long: `List the byte ranges that changed between snapshot (or bookmark) BASE and the
later snapshot SNAP, or the live origin when SNAP is left out (or is the origin's
name): the same ranges the qemu:dirty-bitmap:BASE context of SNAP's export (or
of the origin export) reports to NBD clients. A range "changed" may hold bytes
that were rewritten with the same contents, and ranges are whole blocks of
BASE's granularity (its cluster size); a block not listed is certain to be the
same in both.

The answer is exact or refused: BASE must be a valid persistent snapshot or
bookmark that existed when SNAP was created, and still be there ("status"
lists each snapshot's diff bases).

Output: one line per range, "OFFSET LENGTH data" (offsets and lengths in
bytes, like rbd diff), then the total. --json prints {"base", "target",
"granularity", "changed_bytes", "ranges": [{"offset", "length"}]}.`,
		Example: `  nbdsnap diff data/monday tuesday
  nbdsnap diff monday --origin data --json`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case len(args) == 0:
				return usagef("diff needs BASE: %s", synopsis(cmd))
			case len(args) > 2:
				return usagef("diff takes BASE and at most one SNAP, not %d arguments (%s): %s", len(args), quoteArgs(args), synopsis(cmd))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c, base, err := o.target(args[0])
			if err != nil {
				return err
			}
			target := ""
			if len(args) == 2 {
				target = args[1]
			}
			d, err := c.Diff(cmd.Context(), base, target)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if o.json {
				return writeJSON(out, d)
			}
			fmt.Fprintf(out, "%-20s %-20s %s\n", "Offset", "Length", "Type")
			for _, r := range d.Ranges {
				fmt.Fprintf(out, "%-20d %-20d data\n", r.Offset, r.Length)
			}
			fmt.Fprintf(out, "%s changed in %d range(s) since %s (granularity %s)\n",
				formatSize(d.ChangedBytes), len(d.Ranges), d.Base, formatSize(int64(d.Granularity)))
			return nil
		},
	}
	o.addFlags(cmd.Flags(), runDir)
	cmd.Flags().BoolVar(&o.json, "json", false, "print JSON")
	return cmd
}
