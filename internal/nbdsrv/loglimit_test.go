package nbdsrv

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

func TestLogLimiter(t *testing.T) {
	logs := &testenv.SyncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	l := newLogLimiter(log)
	l.period = 100 * time.Millisecond
	for range 25 {
		l.logf(context.Background(), log, slog.LevelWarn, "a: read-only", "refused")
	}
	for range 3 {
		l.logf(context.Background(), log, slog.LevelWarn, "b: read-only", "refused")
	}
	if n := strings.Count(logs.String(), `msg=refused`); n != logBurst+3 {
		t.Fatalf("%d lines logged, want %d:\n%s", n, logBurst+3, logs.String())
	}
	waitFor(t, func() bool { return strings.Contains(logs.String(), "suppressed") })
	out := logs.String()
	if !strings.Contains(out, `lines="refused: a: read-only" suppressed=15`) || strings.Count(out, "suppressed=") != 1 {
		t.Fatalf("want one line counting the 15 suppressed of group a:\n%s", out)
	}
	// A new window logs again.
	l.logf(context.Background(), log, slog.LevelWarn, "a: read-only", "refused")
	if n := strings.Count(logs.String(), `msg=refused`); n != logBurst+4 {
		t.Fatalf("%d lines logged after the window, want %d", n, logBurst+4)
	}
}

// Writes to a read-only export, on several connections, log a burst of
// warnings for the whole server, not one per request or per connection.
func TestRefusalsRateLimited(t *testing.T) {
	ts := startServer(t, Config{}, Export{Name: "ro", Size: 1 << 20, Backend: newMem(1 << 20), ReadOnly: true})
	for range 3 {
		rc := dialRaw(t, ts.addr)
		rc.open("ro", false)
		for i := range 20 {
			rc.request(CmdWrite, 0, uint64(i), 0, 512, make([]byte, 512))
			if e, _, _ := rc.simple(0); e != EPERM {
				t.Fatalf("write to a read-only export: %v", e)
			}
		}
	}
	if n := strings.Count(ts.logs.String(), "nbd: request refused"); n != logBurst {
		t.Fatalf("%d refusals logged for 60 refused writes, want %d", n, logBurst)
	}
}
