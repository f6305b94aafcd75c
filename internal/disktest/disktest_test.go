package disktest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRecordSeesChanges: a changed, a removed and a new file each make the
// trees differ; an untouched tree compares equal.
func TestRecordSeesChanges(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a", "1")
	write("b", "2")
	before := Record(t, dir)
	before.Unchanged(t, Record(t, dir))

	write("a", "changed")
	os.Remove(filepath.Join(dir, "b"))
	write("c", "new")
	after := Record(t, dir)
	var diffs int
	for _, p := range []string{"a", "b", "c"} {
		if before[filepath.Join(dir, p)] != after[filepath.Join(dir, p)] {
			diffs++
		}
	}
	if diffs != 3 {
		t.Errorf("Record saw %d of 3 changes: before %v, after %v", diffs, before, after)
	}
}

// errRecorder counts the errors a check reports instead of failing.
type errRecorder struct {
	testing.TB
	n int
}

func (r *errRecorder) Helper()               {}
func (r *errRecorder) Errorf(string, ...any) { r.n++ }

// TestUnchangedReports: Unchanged reports a changed, a vanished and an
// appeared entry, one error each, and nothing for equal trees.
func TestUnchangedReports(t *testing.T) {
	before := Tree{"a": "1", "b": "2"}
	r := &errRecorder{TB: t}
	before.Unchanged(r, Tree{"a": "1", "b": "2"})
	if r.n != 0 {
		t.Fatalf("equal trees: %d errors", r.n)
	}
	before.Unchanged(r, Tree{"a": "changed", "c": "3"})
	if r.n != 3 {
		t.Errorf("changed a, vanished b, appeared c: %d errors, want 3", r.n)
	}
}
