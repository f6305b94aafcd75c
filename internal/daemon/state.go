package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
)

// The state directory holds one JSON file per snapshot, snap-NAME.json, and
// origin.json, which ties the directory to one origin:
//
//	{"version":1,"origin":"/dev/vdb","origin_id":"8f3c…"}
//	{"version":1,"name":"snap1","backing_path":"/var/lib/nbdsnap/snap1.cow",
//	 "cluster_size":65536,"transient":false,"max_size":0,"created":"2026-…"}
//
// A snapshot that turned invalid has its record rewritten with
// "invalid":true and "reason":"…" (markInvalid), before origin writes go on
// without copying for it: the engine's RecordInvalid hook. A restarted
// daemon does not reopen such a snapshot, even if its store's header says
// valid (the header write may have failed; see cow.EngineOptions). A record
// marked invalid stays so until it is removed: put keeps the mark. Records
// written before these fields existed have neither and load as not marked
// (the version is unchanged). An older nbdsnap ignores the fields: after a
// downgrade it trusts the store header alone, as it always did.
//
// Every file is replaced atomically: written to a temporary name, fsynced,
// renamed over the old name, and the directory fsynced, so a crash leaves
// either the old or the new record, never a torn one, and a record that
// Create reported is on disk.
//
// The origin ID is handed to the engine, which writes it into each store's
// header; a restarted daemon's Reopen refuses a store whose ID differs, so a
// state directory pointed at the wrong origin cannot serve garbage.

const stateVersion = 1

type originRecord struct {
	Version  int    `json:"version"`
	Origin   string `json:"origin"`
	OriginID string `json:"origin_id"`
}

type snapRecord struct {
	Version     int       `json:"version"`
	Name        string    `json:"name"`
	BackingPath string    `json:"backing_path"`
	ClusterSize int       `json:"cluster_size"`
	Transient   bool      `json:"transient"`
	MaxSize     int64     `json:"max_size"`
	Created     time.Time `json:"created"`
	// Invalid: the snapshot turned invalid, for Reason; never served
	// again. See the comment at the top.
	Invalid bool   `json:"invalid,omitempty"`
	Reason  string `json:"reason,omitempty"`
}

type stateDir struct {
	dir string
	// mu serialises the changes of snapshot records: markInvalid (called
	// by snapshot writers) reads, changes and rewrites a record, which put
	// and remove must not interleave with.
	mu sync.Mutex
}

const (
	originFile = "origin.json"
	snapPrefix = "snap-"
	snapSuffix = ".json"
)

// openState creates dir if needed and returns the origin ID recorded there,
// recording a fresh one on first use. A directory recorded for another
// origin path is refused.
func openState(dir, origin string) (*stateDir, string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("state dir: %w", err)
	}
	s := &stateDir{dir: dir}
	// Temporary files of writes a crash interrupted; the records they
	// were to replace are intact (see the comment at the top).
	if tmps, err := filepath.Glob(filepath.Join(dir, ".*.tmp*")); err == nil {
		for _, p := range tmps {
			os.Remove(p)
		}
	}
	var rec originRecord
	b, err := os.ReadFile(filepath.Join(dir, originFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		rec = originRecord{Version: stateVersion, Origin: origin, OriginID: uuid.NewString()}
		if err := s.write(originFile, rec); err != nil {
			return nil, "", err
		}
		return s, rec.OriginID, nil
	case err != nil:
		return nil, "", fmt.Errorf("state dir: %w", err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, "", fmt.Errorf("state dir: %s: %w", filepath.Join(dir, originFile), err)
	}
	if rec.Version != stateVersion {
		return nil, "", fmt.Errorf("state dir %s has version %d, this nbdsnap reads %d", dir, rec.Version, stateVersion)
	}
	if rec.Origin != origin {
		return nil, "", fmt.Errorf("state dir %s belongs to origin %s, not %s", dir, rec.Origin, origin)
	}
	return s, rec.OriginID, nil
}

func snapFile(name string) string { return snapPrefix + name + snapSuffix }

// records returns every snapshot record, sorted by creation time.
func (s *stateDir) records() ([]snapRecord, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	var recs []snapRecord
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, snapPrefix) || !strings.HasSuffix(n, snapSuffix) {
			continue
		}
		r, err := s.read(n)
		if err != nil {
			return nil, err
		}
		recs = append(recs, r)
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].Created.Before(recs[j].Created) })
	return recs, nil
}

// read reads and checks the snapshot record in file.
func (s *stateDir) read(file string) (snapRecord, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, file))
	if err != nil {
		return snapRecord{}, fmt.Errorf("state dir: %w", err)
	}
	var r snapRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return snapRecord{}, fmt.Errorf("state dir: %s: %w", filepath.Join(s.dir, file), err)
	}
	if r.Version != stateVersion || snapFile(r.Name) != file {
		return snapRecord{}, fmt.Errorf("state dir: %s: unexpected version %d or name %q", filepath.Join(s.dir, file), r.Version, r.Name)
	}
	return r, nil
}

// put writes a snapshot's record. A record on disk marked invalid keeps its
// mark and reason: Create rewrites the record after the engine created the
// snapshot, which may already have turned invalid and been marked.
func (s *stateDir) put(r snapRecord) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r.Version = stateVersion
	if old, err := s.read(snapFile(r.Name)); err == nil && old.Invalid {
		r.Invalid, r.Reason = true, old.Reason
	}
	return s.write(snapFile(r.Name), r)
}

// markInvalid marks a snapshot's record invalid, durably; a record already
// marked keeps its first reason. It fails if there is no record: a
// snapshot's record exists from before its store until after its writer
// stopped (Create, Clear).
func (s *stateDir) markInvalid(name, reason string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := s.read(snapFile(name))
	if err != nil {
		return err
	}
	if r.Invalid {
		return nil
	}
	r.Invalid, r.Reason = true, reason
	return s.write(snapFile(name), r)
}

// remove deletes a snapshot's record durably; a missing record is fine.
func (s *stateDir) remove(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Remove(filepath.Join(s.dir, snapFile(name))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state dir: %w", err)
	}
	return syncDir(s.dir)
}

// write replaces file atomically and durably (see the comment at the top).
func (s *stateDir) write(file string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("state dir: encode %s: %w", file, err)
	}
	b = append(b, '\n')
	tmp, err := os.CreateTemp(s.dir, "."+file+".tmp*")
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(b); err != nil {
		return fmt.Errorf("state dir: write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("state dir: sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("state dir: close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(s.dir, file)); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	done = true
	return syncDir(s.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("state dir: sync %s: %w", dir, err)
	}
	return nil
}
