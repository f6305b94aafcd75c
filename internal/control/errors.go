package control

import (
	"errors"
	"net/http"
)

// Sentinel errors a Service wraps so that the Handler picks the right HTTP
// status, and that the Client's [*Error] wraps again on the other side.
var (
	// ErrNotFound: no snapshot of that name.
	ErrNotFound = errors.New("not found")
	// ErrExists: a snapshot or export of that name already exists.
	ErrExists = errors.New("already exists")
	// ErrBusy: a client has the export open (fss answers EBUSY).
	ErrBusy = errors.New("busy")
	// ErrInvalid: the request itself is wrong (bad name, bad cluster size).
	ErrInvalid = errors.New("invalid request")
	// ErrUnavailable: the daemon is starting (settling its snapshots,
	// waiting for backing stores) and cannot answer yet.
	ErrUnavailable = errors.New("unavailable")
	// ErrNoDaemon: nothing listens on the control socket.
	ErrNoDaemon = errors.New("no daemon")
	// ErrProtocol: the peer is not an nbdsnap daemon speaking our API version.
	ErrProtocol = errors.New("control protocol mismatch")
)

// codes maps each sentinel to its wire code and HTTP status, in the order
// errors.Is is tried.
var codes = []struct {
	err    error
	code   string
	status int
}{
	{ErrNotFound, "not_found", http.StatusNotFound},
	{ErrExists, "exists", http.StatusConflict},
	{ErrBusy, "busy", http.StatusConflict},
	{ErrInvalid, "invalid", http.StatusBadRequest},
	{ErrUnavailable, "unavailable", http.StatusServiceUnavailable},
}

// classify returns the wire code and HTTP status for err.
func classify(err error) (code string, status int) {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	return "internal", http.StatusInternalServerError
}

// sentinel returns the sentinel error of a wire code, or nil.
func sentinel(code string) error {
	for _, c := range codes {
		if c.code == code {
			return c.err
		}
	}
	return nil
}

// Error is an error answered by the daemon.
type Error struct {
	Status  int    // HTTP status
	Code    string // wire code: not_found, exists, busy, invalid, unavailable, internal
	Message string // the daemon's one-line explanation
}

func (e *Error) Error() string { return e.Message }

// Unwrap lets errors.Is(err, ErrBusy) work on the client side.
func (e *Error) Unwrap() error { return sentinel(e.Code) }
