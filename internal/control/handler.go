package control

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
)

// Service is what the daemon offers through the control socket. Errors wrap
// the sentinels in errors.go so the Handler can choose a status code.
type Service interface {
	Status(ctx context.Context) (Status, error)
	// Snapshot describes one snapshot; settled waits first until no
	// create or clear is under way.
	Snapshot(ctx context.Context, name string, settled bool) (SnapshotInfo, error)
	Create(ctx context.Context, req CreateRequest) (SnapshotInfo, error)
	Clear(ctx context.Context, name string, force bool) (ClearResult, error)
	// Bookmark drops a snapshot's image and keeps it as a bookmark.
	Bookmark(ctx context.Context, name string, force bool) (SnapshotInfo, error)
	// Diff lists the changes between base and target ("": the origin).
	Diff(ctx context.Context, base, target string) (Diff, error)
	// Rollback starts rolling the origin back to a snapshot.
	Rollback(ctx context.Context, name string, req RollbackRequest) (RollbackStatus, error)
}

// maxBody caps request bodies: a CreateRequest is a few hundred bytes.
const maxBody = 64 << 10

// NewHandler returns the HTTP handler of the v1 API serving svc. version is
// the daemon's build version, sent in HeaderVersion.
func NewHandler(svc Service, version string, log *slog.Logger) http.Handler {
	h := &handler{svc: svc, version: version, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathStatus, h.status)
	mux.HandleFunc("GET "+PathSnapshots, h.list)
	mux.HandleFunc("POST "+PathSnapshots, h.create)
	mux.HandleFunc("GET "+PathSnapshots+"/{name}", h.get)
	mux.HandleFunc("DELETE "+PathSnapshots+"/{name}", h.clear)
	mux.HandleFunc("POST "+PathSnapshots+"/{name}/bookmark", h.bookmark)
	mux.HandleFunc("POST "+PathSnapshots+"/{name}/rollback", h.rollback)
	mux.HandleFunc("GET "+PathDiff, h.diff)
	return h.headers(mux)
}

type handler struct {
	svc     Service
	version string
	log     *slog.Logger
}

// headers stamps the version headers on every answer, 404s included, so a
// client can always tell an nbdsnap daemon from some other HTTP server.
func (h *handler) headers(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(HeaderAPI, APIVersion)
		w.Header().Set(HeaderVersion, h.version)
		next.ServeHTTP(w, r)
	})
}

func (h *handler) status(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.Status(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusOK, st)
}

func (h *handler) list(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.Status(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	snaps := st.Snapshots
	if snaps == nil {
		snaps = []SnapshotInfo{}
	}
	h.reply(w, http.StatusOK, snaps)
}

func (h *handler) get(w http.ResponseWriter, r *http.Request) {
	settled, err := boolParam(r, "settled")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	info, err := h.svc.Snapshot(r.Context(), r.PathValue("name"), settled)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusOK, info)
}

// decode reads a request body: one JSON object of known fields and nothing
// after it. A body with more was not written by our client, and guessing
// which part was meant could create a snapshot, or start a rollback, nobody
// asked for.
func decode(r *http.Request, what string, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: decode %s request: %w", ErrInvalid, what, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: decode %s request: data after the JSON object", ErrInvalid, what)
	}
	return nil
}

func (h *handler) create(w http.ResponseWriter, r *http.Request) {
	var req CreateRequest
	if err := decode(r, "create", &req); err != nil {
		h.fail(w, r, err)
		return
	}
	info, err := h.svc.Create(r.Context(), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusCreated, info)
}

func (h *handler) clear(w http.ResponseWriter, r *http.Request) {
	force, err := boolParam(r, "force")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	res, err := h.svc.Clear(r.Context(), r.PathValue("name"), force)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusOK, res)
}

func (h *handler) bookmark(w http.ResponseWriter, r *http.Request) {
	force, err := boolParam(r, "force")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	info, err := h.svc.Bookmark(r.Context(), r.PathValue("name"), force)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusOK, info)
}

func (h *handler) rollback(w http.ResponseWriter, r *http.Request) {
	var req RollbackRequest
	if err := decode(r, "rollback", &req); err != nil {
		h.fail(w, r, err)
		return
	}
	st, err := h.svc.Rollback(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusAccepted, st)
}

func (h *handler) diff(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("base") == "" {
		h.fail(w, r, fmt.Errorf("%w: diff needs base=SNAPSHOT", ErrInvalid))
		return
	}
	res, err := h.svc.Diff(r.Context(), q.Get("base"), q.Get("target"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.reply(w, http.StatusOK, res)
}

// boolParam reads an optional boolean query parameter.
func boolParam(r *http.Request, name string) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%w: %s=%q is not a boolean", ErrInvalid, name, v)
	}
	return b, nil
}

func (h *handler) reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		h.log.Debug("control: write reply", "err", err)
	}
}

// fail answers an error. Internal errors are logged here, once; the
// client-caused ones are the client's business and are not.
func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, status := classify(err)
	if status == http.StatusInternalServerError {
		h.log.Error("control request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	h.reply(w, status, ErrorBody{Error: err.Error(), Code: code})
}
