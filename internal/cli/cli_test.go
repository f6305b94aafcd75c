package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// fakeDaemon answers the control API from memory and records requests.
type fakeDaemon struct {
	name    string // the daemon's (origin's) name
	mu      sync.Mutex
	snaps   []control.SnapshotInfo
	busy    map[string]bool
	creates []control.CreateRequest
	clears  []string
	kept    string // what Clear reports it left in place
	// ops is held by Create, as the daemon's ops lock is: a settled
	// Snapshot waits for it.
	ops sync.Mutex
	// slowCreate: Create waits for the client to give up, then this long,
	// then succeeds if pastInstant, else abandons the create.
	slowCreate  time.Duration
	pastInstant bool
	// rollback is the rollback under way: every Status call copies
	// rollbackStep more bytes back, and at the end it fails with
	// rollbackErr if set.
	rollback     *control.RollbackStatus
	rollbackStep int64
	rollbackErr  string
}

func (f *fakeDaemon) Status(context.Context) (control.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := control.Status{Name: f.name, Origin: "/dev/vdb", OriginSize: 1 << 30, Version: "v-test",
		Listen: []string{"unix:/run/nbdsnap/data.sock"}, Started: time.Now(),
		Snapshots: append([]control.SnapshotInfo{}, f.snaps...)}
	if rb := f.rollback; rb != nil {
		rb.RemainingBytes = max(0, rb.RemainingBytes-f.rollbackStep)
		switch {
		case rb.RemainingBytes > 0:
		case f.rollbackErr != "":
			rb.State, rb.Error, rb.RemainingBytes = control.RollbackFailed, f.rollbackErr, 1
		default:
			rb.State = control.RollbackDone
		}
		c := *rb
		st.Rollback = &c
	}
	return st, nil
}

func (f *fakeDaemon) Rollback(_ context.Context, name string, req control.RollbackRequest) (control.RollbackStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.busy[f.name] && !req.Force {
		return control.RollbackStatus{}, fmt.Errorf("the origin export %q is open by 1 NBD client(s): %w", f.name, control.ErrBusy)
	}
	for _, s := range f.snaps {
		if s.Name == name {
			f.rollback = &control.RollbackStatus{Snapshot: name, UUID: "u-" + name, State: control.RollbackRunning,
				Started: time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC), Consume: req.Consume, Rate: req.Rate,
				TotalBytes: 100 << 20, RemainingBytes: 100 << 20}
			return *f.rollback, nil
		}
	}
	return control.RollbackStatus{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
}

func (f *fakeDaemon) Snapshot(_ context.Context, name string, settled bool) (control.SnapshotInfo, error) {
	if settled { // after any create under way
		f.ops.Lock()
		defer f.ops.Unlock()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.snaps {
		if s.Name == name {
			return s, nil
		}
	}
	return control.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
}

func (f *fakeDaemon) Create(ctx context.Context, req control.CreateRequest) (control.SnapshotInfo, error) {
	f.ops.Lock()
	defer f.ops.Unlock()
	if f.slowCreate > 0 {
		// A create held up before its instant: the client gives up (its
		// request context ends), then the daemon decides.
		<-ctx.Done()
		time.Sleep(f.slowCreate)
		if !f.pastInstant {
			return control.SnapshotInfo{}, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.creates = append(f.creates, req)
	for _, s := range f.snaps {
		if s.Name == req.Name {
			return control.SnapshotInfo{}, fmt.Errorf("snapshot %q %w", req.Name, control.ErrExists)
		}
	}
	cs := req.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	s := control.SnapshotInfo{Name: req.Name, Origin: f.name, State: control.StateValid, UUID: req.UUID,
		Created: time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC), Persistent: !req.Transient,
		ClusterSize: cs, ClustersTotal: 16384, BackingPath: req.BackingPath}
	f.snaps = append(f.snaps, s)
	return s, nil
}

func (f *fakeDaemon) Clear(_ context.Context, name string, force bool) (control.ClearResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, s := range f.snaps {
		if s.Name != name {
			continue
		}
		if f.busy[name] && !force {
			return control.ClearResult{}, fmt.Errorf("snapshot %q is open by 1 NBD client(s); disconnect them or use --force: %w", name, control.ErrBusy)
		}
		f.snaps = append(f.snaps[:i], f.snaps[i+1:]...)
		f.clears = append(f.clears, name)
		return control.ClearResult{Kept: f.kept}, nil
	}
	return control.ClearResult{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
}

// startFake serves a fake daemon at DIR/data.ctl and returns it and DIR.
func (f *fakeDaemon) Bookmark(_ context.Context, name string, force bool) (control.SnapshotInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, s := range f.snaps {
		if s.Name == name {
			f.snaps[i].Bookmark = true
			return f.snaps[i], nil
		}
	}
	return control.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, control.ErrNotFound)
}

func (f *fakeDaemon) Diff(_ context.Context, base, target string) (control.Diff, error) {
	if base == "gone" {
		return control.Diff{}, fmt.Errorf("%w: %s cannot report exact changes since %q", control.ErrInvalid, target, base)
	}
	return control.Diff{Base: base, Target: target, Granularity: 65536, ChangedBytes: 3 << 16,
		Ranges: []control.Range{{Offset: 0, Length: 65536}, {Offset: 1 << 20, Length: 2 << 16}}}, nil
}

func startFake(t *testing.T) (*fakeDaemon, string) {
	t.Helper()
	dir := t.TempDir()
	return serveFake(t, dir, "data"), dir
}

// serveFake serves a fake daemon called name at dir/name.ctl, with the
// snapshots snap0 (valid) and gone1 (invalid).
func serveFake(t *testing.T, dir, name string) *fakeDaemon {
	t.Helper()
	f := &fakeDaemon{name: name, busy: map[string]bool{}}
	f.snaps = []control.SnapshotInfo{{
		Name: "snap0", Origin: name, State: control.StateValid,
		Created:     time.Date(2026, 11, 20, 8, 30, 0, 0, time.UTC),
		Persistent:  true,
		ClusterSize: 64 << 10, ClustersTotal: 16384, ClustersCopied: 1234,
		BackingPath: "/var/lib/nbdsnap/snap0.cow", BackingBytes: 77 << 20, StoreFree: 1 << 30,
	}, {
		Name: "gone1", Origin: name, State: control.StateInvalid,
		Reason:  "transient snapshot: it did not survive the daemon restart",
		Created: time.Date(2026, 11, 20, 9, 0, 0, 0, time.UTC), ClusterSize: 4096,
		BackingPath: "/var/lib/nbdsnap/gone1.cow",
	}}
	l, err := net.Listen("unix", filepath.Join(dir, name+".ctl"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: control.NewHandler(f, "v-test", slog.New(slog.DiscardHandler))}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return f
}

// run executes the CLI; the client commands' --name looks in runDir.
func run(t *testing.T, runDir string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	root := newRoot("v-cli", runDir)
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	code = exitCode(root.ExecuteContext(context.Background()), &errb)
	return out.String(), errb.String(), code
}

func TestCommands(t *testing.T) {
	f, dir := startFake(t)
	ctl := filepath.Join(dir, "data.ctl")
	missing := filepath.Join(dir, "nobody.ctl")
	tests := []struct {
		name    string
		args    []string
		code    int
		stdout  []string // substrings
		stderr  string   // substring; "" means stderr must be empty
		creates int      // create requests the daemon must have seen afterwards
	}{
		{"status by name", []string{"status", "--name", "data"}, 0,
			[]string{"data: origin /dev/vdb (1 GiB)", ", version v-test\n", "snap0: origin data, taken 2026-11-20 08:30:00 UTC, persistent, 64 KiB clusters, 1234/16384 copied, 77 MiB backing, valid, 1 GiB free for the store",
				"gone1: origin data, taken 2026-11-20 09:00:00 UTC, transient, 4 KiB clusters, 0 B backing, invalid (transient snapshot: it did not survive the daemon restart)"}, "", 0},
		{"status by control", []string{"status", "--control", ctl}, 0, []string{"snap0: origin data"}, "", 0},
		{"status one", []string{"status", "snap0", "--control", ctl}, 0, []string{"snap0: origin data"}, "", 0},
		{"status missing snapshot", []string{"status", "nope", "--control", ctl}, 1, nil, `nbdsnap: snapshot "nope": not found`, 0},
		{"list", []string{"list", "--control", ctl}, 0, []string{"snap0: ", "gone1: "}, "", 0},
		{"no daemon", []string{"status", "--control", missing}, 1, nil,
			"nbdsnap: no daemon at " + missing + " — is `nbdsnap serve` running?\n", 0},
		{"no daemon by name", []string{"list", "--name", "nobody"}, 1, nil, "no daemon at " + missing, 0},
		{"both control and name", []string{"list", "--name", "data", "--control", ctl}, 2, nil, "not both", 0},
		{"unknown flag", []string{"list", "--bogus"}, 2, nil, "unknown flag: --bogus", 0},
		{"unknown command", []string{"snapshot"}, 2, nil, `nbdsnap: unknown command "snapshot"; see nbdsnap --help`, 0},
		{"no command prints help", []string{}, 0, []string{"Available Commands:"}, "", 0},
		{"create needs arg", []string{"create", "--backing", "/x"}, 2, nil, "nbdsnap: create needs SNAP: nbdsnap create [ORIGIN/]SNAP --backing PATH\n", 0},
		{"create needs backing", []string{"create", "s", "--name", "data"}, 2, nil, "create needs --backing PATH", 0},
		{"create bad cluster size", []string{"create", "s", "--name", "data", "--backing", "/b", "--cluster-size", "3K"}, 2, nil,
			"invalid --cluster-size 3 KiB: must be a power of two from 4K to 1M", 0},
		{"create huge cluster size", []string{"create", "s", "--name", "data", "--backing", "/b", "--cluster-size", "2M"}, 2, nil,
			"invalid --cluster-size 2 MiB", 0},
		{"create malformed size", []string{"create", "s", "--name", "data", "--backing", "/b", "--cluster-size", "lots"}, 2, nil,
			`invalid argument "lots" for "--cluster-size" flag`, 0},
		{"create", []string{"create", "s1", "--name", "data", "--backing", "/b/s1.cow", "--cluster-size", "16K", "--max-size", "1.5G"}, 0,
			[]string{"s1: origin data, taken 2026-11-21 12:00:00 UTC, persistent, 16 KiB clusters, 0/16384 copied, 0 B backing, valid"}, "", 1},
		{"create exists", []string{"create", "snap0", "--name", "data", "--backing", "/b/x"}, 1, nil, `nbdsnap: snapshot "snap0" already exists`, 2},
		{"clear", []string{"clear", "s1", "--name", "data"}, 0, []string{"s1: cleared\n"}, "", 2},
		{"clear missing", []string{"clear", "s1", "--name", "data"}, 1, nil, `snapshot "s1": not found`, 2},
		{"version", []string{"version"}, 0, []string{"nbdsnap v-cli ("}, "", 2},
		{"version with daemon", []string{"version", "--name", "data"}, 0, []string{"nbdsnap v-cli (", "daemon at " + ctl + ": nbdsnap v-test"}, "", 2},
		{"serve needs name", []string{"serve", "/dev/null"}, 2, nil, "serve needs --name NAME", 2},
		{"serve bad name", []string{"serve", "/dev/null", "--name", "../x"}, 2, nil, "--name: name \"../x\" must be", 2},
		{"serve TLS without certificate", []string{"serve", "/dev/null", "--name", "data", "--tls", "require"}, 2, nil,
			"--tls=require needs the server's certificate and key (--tls-cert and --tls-key)", 2},
		{"serve bad TLS mode", []string{"serve", "/dev/null", "--name", "data", "--tls", "maybe"}, 2, nil, `--tls "maybe": want off, allow or require`, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errs, code := run(t, dir, tt.args...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tt.code, out, errs)
			}
			for _, s := range tt.stdout {
				if !strings.Contains(out, s) {
					t.Errorf("stdout %q lacks %q", out, s)
				}
			}
			if tt.stderr == "" && errs != "" || !strings.Contains(errs, tt.stderr) {
				t.Errorf("stderr %q, want %q", errs, tt.stderr)
			}
			if strings.Count(errs, "\n") > 1 {
				t.Errorf("stderr is more than one line: %q", errs)
			}
			f.mu.Lock()
			n := len(f.creates)
			f.mu.Unlock()
			if n != tt.creates {
				t.Errorf("daemon saw %d creates, want %d", n, tt.creates)
			}
		})
	}
	// The create above sent parsed sizes, an absolute backing path, its
	// timeout, and a fresh store UUID to recognise its snapshot by.
	want := control.CreateRequest{Name: "s1", BackingPath: "/b/s1.cow", ClusterSize: 16 << 10, MaxSize: 3 << 29, TimeoutMillis: 60000}
	got := f.creates[0]
	if _, err := uuid.Parse(got.UUID); err != nil {
		t.Errorf("create request UUID %q: %v", got.UUID, err)
	}
	got.UUID = ""
	if got != want {
		t.Errorf("create request %+v, want %+v", got, want)
	}
}

// TestCreateAnswerLost: when the client gives up waiting (its timeout, an
// interrupt), the create's outcome is still the daemon's: the CLI asks the
// daemon, once the create has finished, whether the snapshot with its UUID
// exists, and reports that — success if the daemon got past the instant,
// "nothing was created" if it abandoned the create.
func TestCreateAnswerLost(t *testing.T) {
	for _, tc := range []struct {
		name        string
		pastInstant bool
		code        int
		stdout      string
		stderr      string
	}{
		{"daemon took it", true, 0, "late: origin data", "the daemon had passed the create instant: the snapshot exists"},
		{"daemon abandoned it", false, 1, "", "create of late abandoned before its instant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, dir := startFake(t)
			f.slowCreate = time.Second
			f.pastInstant = tc.pastInstant
			start := time.Now()
			out, errs, code := run(t, dir, "create", "late", "--name", "data", "--backing", "/b/late.cow", "--timeout", "1ms")
			if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errs, tc.stderr) {
				t.Fatalf("exit %d, stdout %q, stderr %q; want exit %d, %q, %q", code, out, errs, tc.code, tc.stdout, tc.stderr)
			}
			// The answer came after the daemon finished, not at the client's deadline.
			if d := time.Since(start); d < f.slowCreate {
				t.Fatalf("the CLI reported after %v, before the daemon decided (%v)", d, f.slowCreate)
			}
		})
	}
}

func TestCreateRelativeBacking(t *testing.T) {
	f, dir := startFake(t)
	t.Chdir(dir)
	if _, errs, code := run(t, dir, "create", "s2", "--name", "data", "--backing", "s2.cow", "--transient"); code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if got := f.creates[0]; got.BackingPath != filepath.Join(dir, "s2.cow") || !got.Transient {
		t.Fatalf("request %+v", got)
	}
}

func TestClearBusy(t *testing.T) {
	f, dir := startFake(t)
	f.busy["snap0"] = true
	_, errs, code := run(t, dir, "clear", "snap0", "--name", "data")
	if code != 1 || !strings.Contains(errs, "open by 1 NBD client(s); disconnect them or use --force") {
		t.Fatalf("exit %d stderr %q", code, errs)
	}
	if len(f.clears) != 0 {
		t.Fatalf("cleared %v despite busy", f.clears)
	}
	if _, errs, code := run(t, dir, "clear", "snap0", "--name", "data", "--force"); code != 0 {
		t.Fatalf("--force: exit %d %s", code, errs)
	}
	if len(f.clears) != 1 {
		t.Fatalf("clears %v", f.clears)
	}
}

func TestBookmarkAndDiff(t *testing.T) {
	f, dir := startFake(t)
	out, errs, code := run(t, dir, "clear", "snap0", "--name", "data", "--bookmark")
	if code != 0 || !strings.Contains(out, "kept as a bookmark") || len(f.clears) != 0 {
		t.Fatalf("clear --bookmark: exit %d, %q %q, clears %v", code, out, errs, f.clears)
	}
	if out, _, _ := run(t, dir, "list", "--name", "data"); !strings.Contains(out, "snap0: origin data, taken 2026-11-20 08:30:00 UTC, bookmark, persistent, 64 KiB clusters, 1234/16384 written since, ") {
		t.Fatalf("list does not show the bookmark: %q", out)
	}
	out, errs, code = run(t, dir, "diff", "data/snap0", "later")
	want := "Offset               Length               Type\n" +
		"0                    65536                data\n" +
		"1048576              131072               data\n" +
		"192 KiB changed in 2 range(s) since snap0 (granularity 64 KiB)\n"
	if code != 0 || out != want {
		t.Fatalf("diff: exit %d %q, stdout\n%s\nwant\n%s", code, errs, out, want)
	}
	out, _, code = run(t, dir, "diff", "snap0", "--name", "data", "--json")
	var d control.Diff
	if err := json.Unmarshal([]byte(out), &d); code != 0 || err != nil || d.Target != "" || d.ChangedBytes != 3<<16 || len(d.Ranges) != 2 {
		t.Fatalf("diff --json against the origin: exit %d, %v, %+v", code, err, d)
	}
	if _, errs, code := run(t, dir, "diff", "gone", "later", "--name", "data"); code != 1 || !strings.Contains(errs, "cannot report exact changes") {
		t.Fatalf("diff against a missing base: exit %d, %q", code, errs)
	}
	if _, errs, code := run(t, dir, "diff", "--name", "data"); code != 2 || !strings.Contains(errs, "diff needs BASE") {
		t.Fatalf("diff without BASE: exit %d, %q", code, errs)
	}
}

func TestStatusJSON(t *testing.T) {
	_, dir := startFake(t)
	out, errs, code := run(t, dir, "status", "--json", "--name", "data")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var raw map[string]any
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, out)
	}
	snaps := raw["snapshots"].([]any)
	s0 := snaps[0].(map[string]any)
	for _, k := range []string{"name", "origin", "state", "reason", "created", "persistent", "cluster_size",
		"clusters_total", "clusters_copied", "backing_path", "backing_bytes", "stats"} {
		if _, ok := s0[k]; !ok && k != "reason" {
			t.Errorf("status --json lacks %q", k)
		}
	}
	if _, err := time.Parse(time.RFC3339, s0["created"].(string)); err != nil {
		t.Errorf("created %v is not RFC 3339", s0["created"])
	}
	if r := snaps[1].(map[string]any)["reason"]; r == nil || r == "" {
		t.Errorf("invalid snapshot without reason: %v", snaps[1])
	}
	if v := raw["version"]; v != "v-test" {
		t.Errorf("status --json: daemon version %v, want v-test", v)
	}

	out, _, code = run(t, dir, "list", "--json", "--name", "data")
	var list []control.SnapshotInfo
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 2 || list[0].ClustersCopied != 1234 {
		t.Fatalf("list --json: %d %q", code, out)
	}
}

func TestFindSingleDaemon(t *testing.T) {
	_, dir := startFake(t)
	if out, errs, code := run(t, dir, "list"); code != 0 || !strings.Contains(out, "snap0") {
		t.Fatalf("one daemon in run dir: exit %d %q %q", code, out, errs)
	}
	empty := t.TempDir()
	if _, errs, code := run(t, empty, "list"); code != 2 || !strings.Contains(errs, "no daemon found in "+empty) {
		t.Fatalf("no daemon: exit %d %q", code, errs)
	}
}

func TestManPages(t *testing.T) {
	dir := t.TempDir()
	if _, errs, code := run(t, dir, "man", "--dir", dir); code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, p := range []string{"nbdsnap.8", "nbdsnap-create.8", "nbdsnap-serve.8", "nbdsnap-clear.8"} {
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil || !bytes.Contains(b, []byte(".TH")) {
			t.Errorf("%s: %v", p, err)
		}
	}
}

func TestCompletion(t *testing.T) {
	out, errs, code := run(t, t.TempDir(), "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_nbdsnap") {
		t.Fatalf("exit %d %q, stdout %d bytes", code, errs, len(out))
	}
}
