package daemon

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"time"

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
	// StateDir records the snapshots (state.go), so that a restarted
	// daemon reopens them and never serves one it must not. Required.
	StateDir string
	// WaitStores, if positive, is how long a starting daemon waits for
	// missing backing stores to appear (a file system mounted late) before
	// it serves the origin without them, which invalidates their snapshots.
	WaitStores time.Duration
	// AcceptMovedOrigin: the user says the origin moved (another path,
	// another device holding the same data): snapshots whose recorded
	// origin identity differs are reopened and take the new identity.
	AcceptMovedOrigin bool
	// CrashPoint, for tests: the daemon kills itself with SIGKILL when it
	// reaches this named step of a create or clear ("create:record",
	// "create:store", "create:instant", "create:placed", "create:ready",
	// "clear:marked", "clear:stopped", "clear:retired").
	CrashPoint string
	// CacheBytes is the copy-on-write cache budget per snapshot; 0 means
	// the engine's default.
	CacheBytes int64
	// HeldBytes is the size of the held-writes log (held.go), the budget
	// of held writes: first writes under a persistent snapshot answered
	// before their commit, their origin write held until it. 0 means
	// DefaultHeldBytes; negative: never hold.
	HeldBytes int64
	// RequestMemory bounds the request payloads held in memory by all NBD
	// clients together (nbdsrv.Config.MaxBytes); 0 means nbdsrv's default.
	RequestMemory int64
	// TLS configures TLS on the NBD listeners (tls.go); the zero value
	// offers none.
	TLS TLSConfig
	// InsecureTCP lets a TCP listener on an address other than loopback
	// serve without requiring TLS.
	InsecureTCP bool
	// MetricsListen, if set, is a TCP address ("HOST:PORT", or ":PORT"
	// for loopback) where /metrics serves Prometheus metrics.
	MetricsListen string
	// SpaceInterval is how often the daemon checks every snapshot store's
	// space against --max-size and its file system (space.go); 0 means
	// every 5 seconds.
	SpaceInterval time.Duration
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
