package cli

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCheckProgress: --progress reports on stderr, stdout stays the report.
func TestCheckProgress(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.cow")
	makeStore(t, good)
	out, errs, code := run(t, dir, "check", "--progress", good)
	want := "check: verified 1 of 2 copied clusters (50%)\ncheck: verified 2 of 2 copied clusters (100%)\n"
	if code != 0 || errs != want || !strings.HasSuffix(out, ", ok\n") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want stderr %q", code, out, errs, want)
	}
	if _, errs, _ := run(t, dir, "check", good); errs != "" {
		t.Fatalf("progress without --progress: %q", errs)
	}
}

// TestProgressPrinter: a line at each tenth, and one whenever 5 seconds
// passed since the last.
func TestProgressPrinter(t *testing.T) {
	var b bytes.Buffer
	clock := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	p := progressPrinter(&b, func() time.Time { return clock })
	for done := 1; done <= 40; done++ {
		if done == 7 {
			clock = clock.Add(6 * time.Second) // a slow stretch
		}
		p(done, 40)
	}
	var want strings.Builder
	for _, d := range []int{4, 7, 8, 12, 16, 20, 24, 28, 32, 36, 40} {
		fmt.Fprintf(&want, "check: verified %d of 40 copied clusters (%d%%)\n", d, d*100/40)
	}
	if b.String() != want.String() {
		t.Fatalf("lines:\n%s\nwant:\n%s", b.String(), want.String())
	}
}
