package daemon

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// Config is what `nbdsnap serve` was asked to do.
type Config struct {
	// Name names the daemon and the origin's NBD export; it must pass
	// ValidName.
	Name string
	// Origin is the path of a block device or regular file.
	Origin string
	// Listen holds NBD listen addresses: "unix:PATH" or "tcp:HOST:PORT"
	// (an empty HOST means 127.0.0.1). Empty means one unix socket at
	// DefaultSocketPath(Name).
	Listen []string
	// Control is the control socket's path; empty means
	// control.DefaultPath(Name).
	Control string
	// StateDir, when set, records persistent snapshots so that a restarted
	// daemon reopens them. Empty means nothing survives a restart.
	StateDir string
	// CacheBytes is the copy-on-write cache budget per snapshot; 0 means
	// the engine's default.
	CacheBytes int64
	// Version is the build version reported over the control socket.
	Version string
	// Logger receives everything the daemon logs; nil discards.
	Logger *slog.Logger
}

// RunDir is where default sockets live.
const RunDir = control.RunDir

// DefaultSocketPath is the NBD socket a daemon named name listens on when
// no --listen is given.
func DefaultSocketPath(name string) string { return filepath.Join(RunDir, name+".sock") }

// validName is what daemon and snapshot names may look like: they become NBD
// export names and file names in the state directory, so no slashes, no
// leading dot, nothing a shell or a URI would need to quote.
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidName returns an error unless name can name a daemon or a snapshot.
func ValidName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("name %q must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}
