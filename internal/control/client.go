package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
)

// Client talks to one daemon's control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the control socket at path. It does not
// dial until the first request.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableCompression: true,
	}
	return &Client{path: path, http: &http.Client{Transport: tr}}
}

// Path is the control socket the client talks to.
func (c *Client) Path() string { return c.path }

// Status returns the daemon's status with every snapshot.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	_, err := c.do(ctx, http.MethodGet, PathStatus, nil, &st)
	return st, err
}

// Snapshots lists the snapshots.
func (c *Client) Snapshots(ctx context.Context) ([]SnapshotInfo, error) {
	var s []SnapshotInfo
	_, err := c.do(ctx, http.MethodGet, PathSnapshots, nil, &s)
	return s, err
}

// Snapshot describes one snapshot.
func (c *Client) Snapshot(ctx context.Context, name string) (SnapshotInfo, error) {
	var s SnapshotInfo
	_, err := c.do(ctx, http.MethodGet, PathSnapshots+"/"+url.PathEscape(name), nil, &s)
	return s, err
}

// SettledSnapshot describes one snapshot once no create or clear is under
// way in the daemon: the answer a client needs after it lost the answer to
// its own create.
func (c *Client) SettledSnapshot(ctx context.Context, name string) (SnapshotInfo, error) {
	var s SnapshotInfo
	_, err := c.do(ctx, http.MethodGet, PathSnapshots+"/"+url.PathEscape(name)+"?settled=1", nil, &s)
	return s, err
}

// Create takes a snapshot.
func (c *Client) Create(ctx context.Context, req CreateRequest) (SnapshotInfo, error) {
	var s SnapshotInfo
	_, err := c.do(ctx, http.MethodPost, PathSnapshots, req, &s)
	return s, err
}

// Clear removes a snapshot. Without force it fails with an error wrapping
// ErrBusy while a client has the snapshot's export open.
func (c *Client) Clear(ctx context.Context, name string, force bool) (ClearResult, error) {
	p := PathSnapshots + "/" + url.PathEscape(name)
	if force {
		p += "?force=1"
	}
	var res ClearResult
	_, err := c.do(ctx, http.MethodDelete, p, nil, &res)
	return res, err
}

// Bookmark drops a snapshot's image and keeps it as a bookmark. Without
// force it fails with an error wrapping ErrBusy while a client has the
// snapshot's export open.
func (c *Client) Bookmark(ctx context.Context, name string, force bool) (SnapshotInfo, error) {
	p := PathSnapshots + "/" + url.PathEscape(name) + "/bookmark"
	if force {
		p += "?force=1"
	}
	var s SnapshotInfo
	_, err := c.do(ctx, http.MethodPost, p, nil, &s)
	return s, err
}

// Rollback starts rolling the origin back to snapshot name; it answers once
// the origin shows the snapshot's content (the copy goes on in the
// background: Status reports it). Without req.Force it fails with an error
// wrapping ErrBusy while clients have the origin export open.
func (c *Client) Rollback(ctx context.Context, name string, req RollbackRequest) (RollbackStatus, error) {
	var st RollbackStatus
	_, err := c.do(ctx, http.MethodPost, PathSnapshots+"/"+url.PathEscape(name)+"/rollback", req, &st)
	return st, err
}

// Diff lists the ranges changed between base and target (a snapshot; ""
// for the origin).
func (c *Client) Diff(ctx context.Context, base, target string) (Diff, error) {
	q := url.Values{"base": {base}}
	if target != "" {
		q.Set("target", target)
	}
	var d Diff
	_, err := c.do(ctx, http.MethodGet, PathDiff+"?"+q.Encode(), nil, &d)
	return d, err
}

// DaemonVersion asks the daemon for its build version.
func (c *Client) DaemonVersion(ctx context.Context) (string, error) {
	st, err := c.Status(ctx)
	return st.Version, err
}

// do sends one request and decodes a 2xx answer into out (when non-nil) or
// an error body into an *Error.
func (c *Client) do(ctx context.Context, method, path string, in, out any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("control: encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	// The host is never resolved: DialContext ignores it and dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://nbdsnap"+path, body)
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	defer resp.Body.Close()

	if v := resp.Header.Get(HeaderAPI); v != APIVersion {
		if v == "" {
			return resp, fmt.Errorf("%w: %s answered without an %s header — not an nbdsnap control socket?", ErrProtocol, c.path, HeaderAPI)
		}
		return resp, fmt.Errorf("%w: daemon at %s speaks control API v%s, this nbdsnap speaks v%s — use matching versions", ErrProtocol, c.path, v, APIVersion)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return resp, fmt.Errorf("control: read answer from %s: %w", c.path, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(raw, &eb) != nil || eb.Error == "" {
			return resp, &Error{Status: resp.StatusCode, Code: "internal",
				Message: fmt.Sprintf("daemon answered %s: %s", resp.Status, strings.TrimSpace(string(raw)))}
		}
		return resp, &Error{Status: resp.StatusCode, Code: eb.Code, Message: eb.Error}
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return resp, fmt.Errorf("control: decode answer from %s: %w", c.path, err)
		}
	}
	return resp, nil
}

// dialError turns a failure to reach the socket into the one line a user
// needs; other transport errors keep their detail.
func (c *Client) dialError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			return fmt.Errorf("control socket %s: permission denied (it is mode 0600; run as its owner, usually root)", c.path)
		}
		return fmt.Errorf("%w at %s — is `nbdsnap serve` running?", ErrNoDaemon, c.path)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("control: %s: %w", c.path, err)
	}
	return fmt.Errorf("control: talk to daemon at %s: %w", c.path, err)
}
