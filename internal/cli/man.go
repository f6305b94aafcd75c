package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

type manOptions struct {
	dir string
}

func newManCommand() *cobra.Command {
	o := &manOptions{}
	cmd := &cobra.Command{
		Use:   "man --dir DIR",
		Short: "Write man pages for every command into DIR",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.dir == "" {
				return usagef("man needs --dir DIR")
			}
			if err := os.MkdirAll(o.dir, 0o755); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			hdr := &doc.GenManHeader{Title: "NBDSNAP", Section: "8", Source: "nbdsnap"}
			root := cmd.Root()
			root.DisableAutoGenTag = true
			if err := doc.GenManTree(root, hdr, o.dir); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "man pages written to %s\n", o.dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&o.dir, "dir", "", "output directory")
	return cmd
}
