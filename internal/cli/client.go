package cli

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"

	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/daemon"
)

// clientOptions locate the daemon a client command talks to. A daemon
// serves one origin and is named after it (serve --name NAME), so the
// daemon is found by its control socket (--control PATH) or by the origin's
// name: --origin NAME, or the ORIGIN of a snapshot argument written
// ORIGIN/SNAP, as LVM writes VG/LV. --name is the older, hidden spelling of
// --origin, kept so that scripts go on working.
type clientOptions struct {
	control string
	origin  string
	name    string // --name, the hidden alias of --origin
	runDir  string // where an origin's control socket is; tests point it elsewhere
}

func (o *clientOptions) addFlags(fs *pflag.FlagSet, runDir string) {
	fs.StringVar(&o.control, "control", "", "the daemon's control socket")
	fs.StringVar(&o.origin, "origin", "", "the origin's daemon, by the name it serves (control socket "+runDir+"/NAME.ctl)")
	fs.StringVar(&o.name, "name", "", "old spelling of --origin")
	fs.Lookup("name").Hidden = true
	o.runDir = runDir
}

// named reports whether the command line names a daemon at all.
func (o *clientOptions) named() bool {
	return o.control != "" || o.origin != "" || o.name != ""
}

// originFlag returns the origin given by --origin or --name, and which of
// the two gave it.
func (o *clientOptions) originFlag() (origin, flag string, err error) {
	switch {
	case o.origin != "" && o.name != "" && o.origin != o.name:
		return "", "", usagef("--origin %s and --name %s (its old spelling) differ; give --origin alone", o.origin, o.name)
	case o.origin != "":
		return o.origin, "--origin", nil
	case o.name != "":
		return o.name, "--name", nil
	}
	return "", "", nil
}

// target resolves the command line to the daemon's client and, when arg
// is a snapshot argument (SNAP or ORIGIN/SNAP; "" for none), the
// snapshot's name within that daemon.
func (o *clientOptions) target(arg string) (*control.Client, string, error) {
	origin, flag, err := o.originFlag()
	if err != nil {
		return nil, "", err
	}
	snap := arg
	if before, after, ok := strings.Cut(arg, "/"); ok {
		if before == "" || after == "" || strings.Contains(after, "/") {
			return nil, "", usagef("snapshot %q: want SNAP or ORIGIN/SNAP", arg)
		}
		if origin != "" && origin != before {
			return nil, "", usagef("snapshot %s is on origin %s, but %s says %s; give the origin once", arg, before, flag, origin)
		}
		origin, flag, snap = before, "ORIGIN/SNAP", after
	}
	p, err := o.path(origin, flag)
	if err != nil {
		return nil, "", err
	}
	return control.NewClient(p), snap, nil
}

// path resolves which control socket to use: --control, the origin's
// socket in runDir, or the only socket there.
func (o *clientOptions) path(origin, flag string) (string, error) {
	switch {
	case o.control != "" && origin != "":
		return "", usagef("give --control or the origin (%s), not both", flag)
	case o.control != "":
		return o.control, nil
	case origin != "":
		// The name becomes a path: no slashes, no "..".
		if err := daemon.ValidName(origin); err != nil {
			return "", usageError{fmt.Errorf("%s: origin %w", flag, err)}
		}
		return filepath.Join(o.runDir, origin+".ctl"), nil
	}
	socks, _ := filepath.Glob(filepath.Join(o.runDir, "*.ctl"))
	switch len(socks) {
	case 1:
		return socks[0], nil
	case 0:
		return "", usagef("no daemon found in %s; give --origin NAME or --control PATH", o.runDir)
	}
	return "", usagef("%d daemons in %s; choose one with --origin NAME or ORIGIN/SNAP", len(socks), o.runDir)
}
