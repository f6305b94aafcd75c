package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/daemon"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1
	ExitUsage = 2
	// ExitStopForced: serve stopped, but --stop-timeout ran out first and
	// the stop was forced: snapshots whose backing store had not caught up
	// were invalidated, or connections cut (daemon.ErrStopForced). The
	// units list it in SuccessExitStatus: the daemon did stop as asked.
	ExitStopForced = 3
)

// usageError marks an error in the command line itself (exit code 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// Main runs the command line of the process and returns its exit code.
// stamped is the version the linker set in package main, "" if none (see
// [Version]).
func Main(stamped string) int {
	// SIGINT and SIGTERM cancel the context instead of killing the process,
	// so that deferred cleanup runs: create thaws a frozen filesystem, serve
	// shuts down cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, os.Args[1:], os.Stdout, os.Stderr, Version(stamped))
}

// Run executes the command line args and returns the exit code; version
// is what --version, the version command and the daemon report.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer, version string) int {
	root := NewRootCommand(version)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	return exitCode(root.ExecuteContext(ctx), stderr)
}

// exitCode reports err on stderr and maps it to an exit code.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return ExitOK
	}
	// One line: an error that spans lines would hide its own first line in
	// a scroll of context.
	msg := strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
	fmt.Fprintf(stderr, "nbdsnap: %s\n", msg)
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return ExitUsage
	case errors.Is(err, daemon.ErrStopForced):
		return ExitStopForced
	}
	return ExitError
}

// NewRootCommand builds the whole command tree.
func NewRootCommand(version string) *cobra.Command { return newRoot(version, control.RunDir) }

// newRoot builds the tree; client commands find an origin's daemon in runDir.
func newRoot(version, runDir string) *cobra.Command {
	root := &cobra.Command{
		Use:   "nbdsnap",
		Short: "Copy-on-write block device snapshots served over NBD",
		Long: `nbdsnap serves a block device or file (the origin) read-write over NBD and takes
copy-on-write snapshots of it, each served as a read-only NBD export: NetBSD's
fss(4) in userspace. "nbdsnap serve" runs the daemon for one origin; the other
commands talk to a running daemon over its control socket.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Version:       version,
	}
	// --version prints what the version command prints: the template is
	// the same line with the version left for cobra to fill in.
	root.SetVersionTemplate(versionLine("{{.Version}}") + "\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	// A runnable root with Args, so that an unknown subcommand is a usage
	// error (cobra's own check makes it a plain one); no command prints help.
	root.Args = func(_ *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("unknown command %q; see nbdsnap --help", args[0])
		}
		return nil
	}
	root.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	check := newCheckCommand()
	// Named like the others' (args.go); check.go itself states only the count.
	check.Args = oneArg("BACKING")
	root.AddCommand(
		newServeCommand(version),
		newCreateCommand(runDir),
		newClearCommand(runDir),
		newStatusCommand(runDir),
		newListCommand(runDir),
		newDiffCommand(runDir),
		newRollbackCommand(runDir),
		newVersionCommand(version, runDir),
		newManCommand(),
		check,
	)
	// Positional argument errors are usage errors too, whatever checks them.
	for _, c := range root.Commands() {
		if c.Args != nil {
			args := c.Args
			c.Args = func(cmd *cobra.Command, a []string) error {
				if err := args(cmd, a); err != nil {
					return usageError{err}
				}
				return nil
			}
		}
	}
	return root
}
