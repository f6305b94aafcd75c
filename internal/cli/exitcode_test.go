package cli

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/daemon"
)

// TestExitCodes: each kind of error maps to its documented exit code, with
// one line on stderr; a stop forced at --stop-timeout is 3 even when the
// shutdown also reports another error.
func TestExitCodes(t *testing.T) {
	forced := fmt.Errorf("%w: snapshot(s) s invalidated (daemon stopped before the store caught up)", daemon.ErrStopForced)
	for _, tt := range []struct {
		name string
		err  error
		code int
	}{
		{"success", nil, ExitOK},
		{"failure", errors.New("origin: in use"), ExitError},
		{"usage", usagef("serve needs --name NAME"), ExitUsage},
		{"stop forced", fmt.Errorf("shutdown: %w", forced), ExitStopForced},
		{"stop forced and more", fmt.Errorf("shutdown: %w", errors.Join(forced, errors.New("remove socket: busy"))), ExitStopForced},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := exitCode(tt.err, &stderr); code != tt.code {
				t.Fatalf("exit code %d, want %d", code, tt.code)
			}
			if out := stderr.String(); tt.err != nil && (!strings.HasPrefix(out, "nbdsnap: ") || strings.Count(out, "\n") != 1) {
				t.Fatalf("stderr %q: want one line", out)
			}
		})
	}
}
