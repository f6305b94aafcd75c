package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

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
func Main(version string) int {
	// SIGINT and SIGTERM cancel the context instead of killing the process,
	// so that deferred cleanup runs: create thaws a frozen filesystem, serve
	// shuts down cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, os.Args[1:], os.Stdout, os.Stderr, version)
}

// Run executes the command line args and returns the exit code.
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

// newRoot builds the tree; client commands resolve --name in runDir.
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
	root.AddCommand(
		newServeCommand(version),
		newCreateCommand(runDir),
		newClearCommand(runDir),
		newStatusCommand(runDir),
		newListCommand(runDir),
		newVersionCommand(version, runDir),
		newManCommand(),
		newCheckCommand(),
	)
	// Positional argument errors are usage errors too.
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

// clientOptions locate the daemon a client command talks to.
type clientOptions struct {
	control string
	name    string
	runDir  string // where --name looks; tests point it elsewhere
}

func (o *clientOptions) addFlags(fs *pflag.FlagSet, runDir string) {
	fs.StringVar(&o.control, "control", "", "the daemon's control socket")
	fs.StringVar(&o.name, "name", "", "the daemon's name (control socket "+runDir+"/NAME.ctl)")
	o.runDir = runDir
}

// path resolves which control socket to use.
func (o *clientOptions) path() (string, error) {
	switch {
	case o.control != "" && o.name != "":
		return "", usagef("give --control or --name, not both")
	case o.control != "":
		return o.control, nil
	case o.name != "":
		return filepath.Join(o.runDir, o.name+".ctl"), nil
	}
	socks, _ := filepath.Glob(filepath.Join(o.runDir, "*.ctl"))
	switch len(socks) {
	case 1:
		return socks[0], nil
	case 0:
		return "", usagef("no daemon found in %s; give --name NAME or --control PATH", o.runDir)
	}
	return "", usagef("%d daemons in %s; choose one with --name NAME", len(socks), o.runDir)
}

func (o *clientOptions) client() (*control.Client, error) {
	p, err := o.path()
	if err != nil {
		return nil, err
	}
	return control.NewClient(p), nil
}
