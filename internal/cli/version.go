package cli

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// Version returns the version this binary reports: stamped, the value the
// linker set (make build stamps `git describe --tags --always --dirty`);
// else the main module's version recorded by the go command (v1.2.3 after
// `go install github.com/nbdsnap/nbdsnap/cmd/nbdsnap@v1.2.3`, a pseudo-version
// for a go build in a git checkout); else "devel".
func Version(stamped string) string {
	bi, ok := debug.ReadBuildInfo()
	return versionOf(stamped, bi, ok)
}

func versionOf(stamped string, bi *debug.BuildInfo, ok bool) string {
	if stamped != "" {
		return stamped
	}
	// "(devel)": the go command knew no version (no VCS information).
	if ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// versionLine is what `nbdsnap version` and `nbdsnap --version` print.
func versionLine(version string) string {
	return fmt.Sprintf("nbdsnap %s (%s, %s/%s)", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

type versionOptions struct {
	clientOptions
}

func newVersionCommand(version, runDir string) *cobra.Command {
	o := &versionOptions{}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version (and a daemon's, with --origin or --control)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			fmt.Fprintln(out, versionLine(version))
			if !o.named() {
				return nil
			}
			c, _, err := o.target("")
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
