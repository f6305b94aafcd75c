package daemon

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// A file at the held-writes log's path that is not a log is somebody
// else's: the daemon does not start, and leaves it as it is.
func TestHeldLogPathNotOurs(t *testing.T) {
	e := newEnv(t, 4<<20)
	cfg := e.config()
	path := heldLogPath(cfg.Control, cfg.Name)
	precious := []byte("somebody's notes, not a held-writes log")
	if err := os.WriteFile(path, precious, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := Start(context.Background(), cfg)
	if err == nil {
		d.Shutdown(context.Background())
		t.Fatal("the daemon started over a file in the way of its held-writes log")
	}
	if !strings.Contains(err.Error(), "in the way of the held-writes log") {
		t.Errorf("error %q does not say what is in the way", err)
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, precious) {
		t.Fatalf("the file in the way was changed (read: %v)", err)
	}
	// Started with --held-size 0, the daemon leaves it alone too.
	cfg.HeldBytes = -1
	if d, err := Start(context.Background(), cfg); err == nil {
		d.Shutdown(context.Background())
		t.Fatal("the daemon started over a file in the way of its held-writes log, holding nothing")
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, precious) {
		t.Fatalf("the file in the way was changed (read: %v)", err)
	}
}

// A clean stop removes the log: nothing is left in it to replay, and its
// pages are tmpfs memory.
func TestHeldLogRemovedAtCleanStop(t *testing.T) {
	e := newEnv(t, 4<<20)
	cfg := e.config()
	d, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := heldLogPath(cfg.Control, cfg.Name)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no held-writes log while the daemon runs: %v", err)
	}
	if err := d.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("the held-writes log is still there after a clean stop: %v", err)
	}
}

// A log a killed daemon left for another origin identity (the origin moved)
// is not replayed, and the start says its writes are lost; one of an
// earlier boot is not replayed either, quietly.
func TestHeldLogOfAnotherOrigin(t *testing.T) {
	boot, err := os.ReadFile(bootIDPath)
	if err != nil {
		t.Skipf("no boot ID: %v", err)
	}
	for _, c := range []struct {
		name, tag, want string
	}{
		{"other origin", strings.TrimSpace(string(boot)) + ":00000000000000000000000000", "of another origin identity"},
		{"earlier boot", "00000000-0000-0000-0000-000000000000:00000000000000000000000000", "of an earlier boot"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, 4<<20)
			cfg := e.config()
			logs := &testenv.SyncBuffer{}
			cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
			l, err := cow.CreateHeldLog(heldLogPath(cfg.Control, cfg.Name), cow.MinHeldLogSize, c.tag)
			if err != nil {
				t.Fatal(err)
			}
			l.Close()
			d := start(t, cfg)
			if !strings.Contains(logs.String(), c.want) {
				t.Errorf("the start does not say the log is %s:\n%s", c.want, logs)
			}
			if got := d.engine.Held(); got.Budget != DefaultHeldBytes {
				t.Errorf("the daemon does not hold writes after finding the log: %+v", got)
			}
		})
	}
}
