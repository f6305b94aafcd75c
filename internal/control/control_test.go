package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeService keeps snapshots in a map and records clear calls.
type fakeService struct {
	mu      sync.Mutex
	snaps   map[string]SnapshotInfo
	busy    map[string]bool
	cleared []string
}

func (f *fakeService) Status(context.Context) (Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := Status{Name: "data", Origin: "/dev/x", Version: "test"}
	for _, s := range f.snaps {
		st.Snapshots = append(st.Snapshots, s)
	}
	return st, nil
}

func (f *fakeService) Snapshot(_ context.Context, name string, _ bool) (SnapshotInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.snaps[name]
	if !ok {
		return SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, ErrNotFound)
	}
	return s, nil
}

func (f *fakeService) Create(_ context.Context, req CreateRequest) (SnapshotInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.Name == "boom" {
		return SnapshotInfo{}, errors.New("disk on fire")
	}
	if _, ok := f.snaps[req.Name]; ok {
		return SnapshotInfo{}, fmt.Errorf("snapshot %q %w", req.Name, ErrExists)
	}
	s := SnapshotInfo{Name: req.Name, BackingPath: req.BackingPath, ClusterSize: req.ClusterSize,
		State: StateValid, Created: time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)}
	f.snaps[req.Name] = s
	return s, nil
}

func (f *fakeService) Bookmark(_ context.Context, name string, force bool) (SnapshotInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.snaps[name]
	if !ok {
		return SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, ErrNotFound)
	}
	if f.busy[name] && !force {
		return SnapshotInfo{}, fmt.Errorf("snapshot %q is open by a client: %w", name, ErrBusy)
	}
	s.Bookmark = true
	f.snaps[name] = s
	return s, nil
}

func (f *fakeService) Rollback(_ context.Context, name string, req RollbackRequest) (RollbackStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.snaps[name]
	if !ok {
		return RollbackStatus{}, fmt.Errorf("snapshot %q: %w", name, ErrNotFound)
	}
	if f.busy[""] && !req.Force {
		return RollbackStatus{}, fmt.Errorf("the origin is open by a client: %w", ErrBusy)
	}
	return RollbackStatus{Snapshot: name, UUID: s.UUID, State: RollbackRunning, Consume: req.Consume, Rate: req.Rate,
		TotalBytes: 8192, RemainingBytes: 8192}, nil
}

func (f *fakeService) Diff(_ context.Context, base, target string) (Diff, error) {
	if base != "s1" {
		return Diff{}, fmt.Errorf("no base %q: %w", base, ErrInvalid)
	}
	return Diff{Base: base, Target: target, Granularity: 4096, ChangedBytes: 8192,
		Ranges: []Range{{Offset: 0, Length: 4096}, {Offset: 65536, Length: 4096}}}, nil
}

func (f *fakeService) Clear(_ context.Context, name string, force bool) (ClearResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.snaps[name]; !ok {
		return ClearResult{}, fmt.Errorf("snapshot %q: %w", name, ErrNotFound)
	}
	if f.busy[name] && !force {
		return ClearResult{}, fmt.Errorf("snapshot %q is open by a client: %w", name, ErrBusy)
	}
	delete(f.snaps, name)
	f.cleared = append(f.cleared, name)
	return ClearResult{Kept: "kept " + name + ".cow"}, nil
}

// serve runs h on a fresh unix socket and returns its path.
func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.ctl")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return path
}

func newFake() *fakeService {
	return &fakeService{snaps: map[string]SnapshotInfo{}, busy: map[string]bool{}}
}

func TestRoundTrip(t *testing.T) {
	f := newFake()
	path := serve(t, NewHandler(f, "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	ctx := context.Background()

	info, err := c.Create(ctx, CreateRequest{Name: "s1", BackingPath: "/b/s1", ClusterSize: 65536})
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "s1" || info.BackingPath != "/b/s1" || info.ClusterSize != 65536 || info.State != StateValid {
		t.Fatalf("create answered %+v", info)
	}
	got, err := c.Snapshot(ctx, "s1")
	if err != nil || !got.Created.Equal(info.Created) {
		t.Fatalf("snapshot: %+v, %v", got, err)
	}
	list, err := c.Snapshots(ctx)
	if err != nil || len(list) != 1 {
		t.Fatalf("list: %v, %v", list, err)
	}
	v, err := c.DaemonVersion(ctx)
	if err != nil || v != "test" {
		t.Fatalf("version %q, %v", v, err)
	}

	d, err := c.Diff(ctx, "s1", "s2")
	if err != nil || d.Base != "s1" || d.Target != "s2" || d.ChangedBytes != 8192 || len(d.Ranges) != 2 || d.Ranges[1].Offset != 65536 {
		t.Fatalf("diff: %+v, %v", d, err)
	}
	if d, err := c.Diff(ctx, "s1", ""); err != nil || d.Target != "" {
		t.Fatalf("diff against the origin: %+v, %v", d, err)
	}
	if _, err := c.Diff(ctx, "nope", "s2"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("diff against a missing base: %v", err)
	}

	f.busy[""] = true
	if _, err := c.Rollback(ctx, "s1", RollbackRequest{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("rollback with the origin open: %v", err)
	}
	if rb, err := c.Rollback(ctx, "s1", RollbackRequest{Force: true, Consume: true, Rate: 1 << 20}); err != nil ||
		rb.Snapshot != "s1" || rb.State != RollbackRunning || !rb.Consume || rb.Rate != 1<<20 {
		t.Fatalf("rollback --force: %+v, %v", rb, err)
	}
	if _, err := c.Rollback(ctx, "nope", RollbackRequest{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rollback to a missing snapshot: %v", err)
	}
	f.busy[""] = false

	f.busy["s1"] = true
	if _, err := c.Bookmark(ctx, "s1", false); !errors.Is(err, ErrBusy) {
		t.Fatalf("bookmark busy: %v", err)
	}
	if b, err := c.Bookmark(ctx, "s1", true); err != nil || !b.Bookmark {
		t.Fatalf("bookmark --force: %+v, %v", b, err)
	}
	f.busy["s1"] = true
	_, err = c.Clear(ctx, "s1", false)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "open by a client") {
		t.Fatalf("clear busy: %v", err)
	}
	if res, err := c.Clear(ctx, "s1", true); err != nil || res.Kept != "kept s1.cow" {
		t.Fatalf("clear --force: %+v, %v", res, err)
	}
	if len(f.cleared) != 1 {
		t.Fatalf("cleared %v", f.cleared)
	}
}

func TestEmptyListIsArray(t *testing.T) {
	path := serve(t, NewHandler(newFake(), "v9", slog.New(slog.DiscardHandler)))
	// Read the raw body: a script parsing `list --json` wants [], not null.
	c := NewClient(path)
	req, _ := http.NewRequest(http.MethodGet, "http://x"+PathSnapshots, nil)
	r, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	if strings.TrimSpace(string(b)) != "[]" {
		t.Fatalf("empty list encoded as %q", b)
	}
}

func TestErrors(t *testing.T) {
	f := newFake()
	f.snaps["old"] = SnapshotInfo{Name: "old"}
	path := serve(t, NewHandler(f, "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	ctx := context.Background()
	tests := []struct {
		name   string
		call   func() error
		is     error
		status int
		msg    string
	}{
		{"not found", func() error { _, err := c.Snapshot(ctx, "nope"); return err }, ErrNotFound, 404, `snapshot "nope": not found`},
		{"exists", func() error { _, err := c.Create(ctx, CreateRequest{Name: "old"}); return err }, ErrExists, 409, `snapshot "old" already exists`},
		{"internal", func() error { _, err := c.Create(ctx, CreateRequest{Name: "boom"}); return err }, nil, 500, "disk on fire"},
		{"clear missing", func() error { _, err := c.Clear(ctx, "nope", false); return err }, ErrNotFound, 404, "not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v (%T), want *Error", err, err)
			}
			if ce.Status != tt.status || !strings.Contains(ce.Message, tt.msg) {
				t.Fatalf("got %d %q, want %d %q", ce.Status, ce.Message, tt.status, tt.msg)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("%v is not %v", err, tt.is)
			}
		})
	}
}

func TestBadRequestBody(t *testing.T) {
	path := serve(t, NewHandler(newFake(), "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	_, err := c.do(context.Background(), http.MethodPost, PathSnapshots, map[string]any{"name": "x", "bogus": 1}, nil)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "bogus") {
		t.Fatalf("unknown field: %v", err)
	}
	err = c.do2(http.MethodDelete, PathSnapshots+"/x?force=maybe")
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad force: %v", err)
	}
}

func (c *Client) do2(method, path string) error {
	_, err := c.do(context.Background(), method, path, nil, nil)
	return err
}

func TestNoDaemon(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.ctl")
	_, err := NewClient(path).Status(context.Background())
	want := "no daemon at " + path + " — is `nbdsnap serve` running?"
	if err == nil || err.Error() != want || !errors.Is(err, ErrNoDaemon) {
		t.Fatalf("got %v, want %q", err, want)
	}

	// A stale socket file nobody listens on (a daemon killed with -9).
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	_, err = NewClient(path).Status(context.Background())
	if err == nil || err.Error() != want {
		t.Fatalf("stale socket: got %v, want %q", err, want)
	}
}

func TestNotOurDaemon(t *testing.T) {
	plain := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") }))
	_, err := NewClient(plain).Status(context.Background())
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "not an nbdsnap control socket") {
		t.Fatalf("plain HTTP server: %v", err)
	}
	newer := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(HeaderAPI, "2")
		io.WriteString(w, "{}")
	}))
	_, err = NewClient(newer).Status(context.Background())
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "speaks control API v2") {
		t.Fatalf("newer daemon: %v", err)
	}
}

func TestHeadersOnNotFound(t *testing.T) {
	path := serve(t, NewHandler(newFake(), "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	req, _ := http.NewRequest(http.MethodGet, "http://x/v0/nothing", nil)
	r, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != 404 || r.Header.Get(HeaderAPI) != APIVersion || r.Header.Get(HeaderVersion) != "v9" {
		t.Fatalf("got %d %v", r.StatusCode, r.Header)
	}
}

// TestStatusKeysAlwaysPresent: a valid snapshot without a limit still has
// uuid, reason and max_size (and the daemon's state_dir) in its JSON, so a
// script reading them does not have to test whether they are there.
func TestStatusKeysAlwaysPresent(t *testing.T) {
	f := newFake()
	f.snaps["s1"] = SnapshotInfo{Name: "s1", State: StateValid}
	path := serve(t, NewHandler(f, "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	req, _ := http.NewRequest(http.MethodGet, "http://x"+PathStatus, nil)
	r, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	var st struct {
		StateDir  *string                      `json:"state_dir"`
		Snapshots []map[string]json.RawMessage `json:"snapshots"`
	}
	if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if st.StateDir == nil {
		t.Error("status has no state_dir")
	}
	if len(st.Snapshots) != 1 {
		t.Fatalf("snapshots %v", st.Snapshots)
	}
	want := map[string]string{"uuid": `""`, "reason": `""`, "max_size": "0", "cache_bytes": "0"}
	for k, v := range want {
		if got, ok := st.Snapshots[0][k]; !ok || string(got) != v {
			t.Errorf("snapshot key %q: %s (present %v), want %s", k, got, ok, v)
		}
	}
}

// TestTrailingDataRefused: a create body with anything but white space
// after its object is refused, and nothing is created.
func TestTrailingDataRefused(t *testing.T) {
	f := newFake()
	path := serve(t, NewHandler(f, "v9", slog.New(slog.DiscardHandler)))
	c := NewClient(path)
	for _, body := range []string{`{"name":"s1"} garbage`, `{"name":"s1"}{"name":"s2"}`, `{"name":"s1"}]`} {
		req, _ := http.NewRequest(http.MethodPost, "http://x"+PathSnapshots, strings.NewReader(body))
		r, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(r.Body)
		r.Body.Close()
		var eb ErrorBody
		if err := json.Unmarshal(b, &eb); err != nil {
			t.Fatalf("%s: answer %s", body, b)
		}
		want := "invalid request: decode create request: data after the JSON object"
		if r.StatusCode != http.StatusBadRequest || eb.Code != "invalid" || eb.Error != want {
			t.Errorf("%s: %d %+v, want 400 %q", body, r.StatusCode, eb, want)
		}
	}
	if len(f.snaps) != 0 {
		t.Fatalf("created %v", f.snaps)
	}
	// Trailing white space (a newline from `curl -d @file`) is fine.
	req, _ := http.NewRequest(http.MethodPost, "http://x"+PathSnapshots, strings.NewReader("{\"name\":\"s1\"}\n\t "))
	r, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusCreated {
		t.Fatalf("object and white space: %d", r.StatusCode)
	}
}
