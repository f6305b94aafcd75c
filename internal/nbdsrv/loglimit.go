package nbdsrv

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// logLimiter rate-limits the log lines a client causes once per request (a
// refused request, a failed one): a client writing in a loop to a
// read-only export, or reading a snapshot that turned invalid, would
// otherwise write a line per request, and reconnecting would not reset a
// per-connection count. Lines are grouped by what they say (message,
// export, reason); within a window of logWindow the first logBurst lines
// of a group are logged, the rest counted, and when the window ends each
// group that lost lines gets one line saying how many.
type logLimiter struct {
	log    *slog.Logger // for the counts of suppressed lines
	period time.Duration

	mu     sync.Mutex
	groups map[string]int // lines seen in this window, by group
	window *time.Timer    // ends the window; nil while no window is open
}

const (
	logWindow = time.Minute
	logBurst  = 10
	// logGroups bounds the groups tracked in a window; lines of further
	// groups share one, so a client cannot grow the map with new reasons.
	logGroups = 256
)

func newLogLimiter(log *slog.Logger) *logLimiter {
	return &logLimiter{log: log, period: logWindow, groups: map[string]int{}}
}

// logf logs msg with args at level to log unless its group (msg and
// group) has used its burst in this window.
func (l *logLimiter) logf(ctx context.Context, log *slog.Logger, level slog.Level, group, msg string, args ...any) {
	key := msg + ": " + group
	l.mu.Lock()
	if _, ok := l.groups[key]; !ok && len(l.groups) >= logGroups {
		key = msg + ": (other)"
	}
	l.groups[key]++
	n := l.groups[key]
	if l.window == nil {
		l.window = time.AfterFunc(l.period, l.endWindow)
	}
	l.mu.Unlock()
	if n <= logBurst {
		log.Log(ctx, level, msg, args...)
	}
}

func (l *logLimiter) endWindow() {
	l.mu.Lock()
	groups := l.groups
	l.groups, l.window = map[string]int{}, nil
	l.mu.Unlock()
	for key, n := range groups {
		if n > logBurst {
			l.log.Warn("nbd: similar log lines suppressed", "lines", key, "suppressed", n-logBurst, "window", l.period)
		}
	}
}
