package cli

import (
	"bufio"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

func TestRollbackCommand(t *testing.T) {
	f, dir := startFake(t)
	f.busy["data"] = true
	if _, errs, code := run(t, dir, "rollback", "data/snap0"); code != 1 || !strings.Contains(errs, "open by 1 NBD client(s)") {
		t.Fatalf("rollback with the origin open: exit %d, %q", code, errs)
	}
	if _, errs, code := run(t, dir, "rollback", "data/nope", "--force"); code != 1 || !strings.Contains(errs, `snapshot "nope": not found`) {
		t.Fatalf("rollback to a missing snapshot: exit %d, %q", code, errs)
	}

	// --wait on a pipe: a line per tenth, then the result on stdout.
	f.rollbackStep = 10 << 20
	out, errs, code := run(t, dir, "rollback", "data/snap0", "--force", "--wait", "--consume", "--rate", "50M")
	if code != 0 {
		t.Fatalf("rollback --wait: exit %d, %q", code, errs)
	}
	if want := "snap0: rollback started: the origin shows snap0 now; 100 MiB to copy back\nsnap0: rollback complete, snap0 cleared\n"; out != want {
		t.Errorf("rollback --wait stdout %q, want %q", out, want)
	}
	lines := strings.Split(strings.TrimSpace(errs), "\n")
	if len(lines) < 5 || !strings.HasPrefix(lines[0], "rollback to snap0: running, 0 B of 100 MiB copied back (0%), consume, at most 50 MiB/s") ||
		!strings.HasPrefix(lines[len(lines)-1], "rollback to snap0: done, 100 MiB of 100 MiB copied back (100%)") {
		t.Errorf("rollback --wait progress:\n%s", errs)
	}
	if f.rollback.Rate != 50<<20 || !f.rollback.Consume {
		t.Errorf("request sent: %+v", f.rollback)
	}

	// status shows the rollback on a line of its own.
	if out, _, _ := run(t, dir, "status", "--name", "data"); !strings.Contains(out, "\nrollback to snap0: done, 100 MiB of 100 MiB copied back (100%)") {
		t.Errorf("status: %q", out)
	}

	// --json --wait: one object per update, remaining never increasing.
	f.busy["data"] = false
	out, errs, code = run(t, dir, "rollback", "snap0", "--name", "data", "--wait", "--json")
	if code != 0 {
		t.Fatalf("rollback --json --wait: exit %d, %q", code, errs)
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	var n int
	last := int64(1 << 62)
	var st control.RollbackStatus
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &st); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		if st.RemainingBytes > last {
			t.Errorf("remaining went up: %d after %d", st.RemainingBytes, last)
		}
		last = st.RemainingBytes
		n++
	}
	if n < 3 || st.State != control.RollbackDone {
		t.Errorf("%d JSON lines, last %+v", n, st)
	}

	// A failure is an error, with the daemon's reason.
	f.rollbackErr = "read cluster 7: input/output error"
	_, errs, code = run(t, dir, "rollback", "data/snap0", "--wait")
	if code != 1 || !strings.Contains(errs, "rollback to snap0 failed: read cluster 7: input/output error") {
		t.Errorf("failed rollback: exit %d, %q", code, errs)
	}
}

func TestProgressBar(t *testing.T) {
	var b strings.Builder
	clock := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	now := func() time.Time { return clock }
	show := progressBar(&b, now)
	st := control.RollbackStatus{Snapshot: "s", State: control.RollbackRunning, TotalBytes: 100 << 20, RemainingBytes: 100 << 20}
	show(st)
	clock = clock.Add(2 * time.Second)
	st.RemainingBytes = 50 << 20
	show(st)
	st.State, st.RemainingBytes = control.RollbackDone, 0
	show(st)
	want := "\r\033[Krollback to s [..............................]   0% 100 MiB left" +
		"\r\033[Krollback to s [###############...............]  50% 50 MiB left, 25 MiB/s" +
		"\r\033[Krollback to s [##############################] 100% 0 B left, 50 MiB/s\n"
	if b.String() != want {
		t.Errorf("bar %q\nwant %q", b.String(), want)
	}
}
