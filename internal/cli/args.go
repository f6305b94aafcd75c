package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
)

// Checks of the positional arguments. Each failure is a usage error that
// names the argument and shows the command's synopsis, e.g.
//
//	create needs SNAP: nbdsnap create [ORIGIN/]SNAP --backing PATH
//
// in place of cobra's "accepts 1 arg(s), received 0".

// oneArg requires exactly one positional argument, called what.
func oneArg(what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		switch {
		case len(args) == 0:
			return usagef("%s needs %s: %s", cmd.Name(), what, synopsis(cmd))
		case len(args) > 1:
			return usagef("%s takes one %s, not %d arguments (%s): %s", cmd.Name(), what, len(args), quoteArgs(args), synopsis(cmd))
		}
		return nil
	}
}

// optionalArg allows one positional argument, called what, or none.
func optionalArg(what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > 1 {
			return usagef("%s takes at most one %s, not %d arguments (%s): %s", cmd.Name(), what, len(args), quoteArgs(args), synopsis(cmd))
		}
		return nil
	}
}

// noArgs refuses positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %s: %s", cmd.Name(), quoteArgs(args), synopsis(cmd))
	}
	return nil
}

// synopsis is the command's usage line as typed: "nbdsnap " and its Use.
func synopsis(cmd *cobra.Command) string {
	if !cmd.HasParent() {
		return cmd.Use
	}
	return cmd.Parent().CommandPath() + " " + cmd.Use
}

func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = fmt.Sprintf("%q", a)
	}
	return strings.Join(q, " ")
}
