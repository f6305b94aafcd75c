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

	"github.com/nbdsnap/nbdsnap/internal/devinfo"
)

// The state directory holds origin.json, which ties the directory to one
// origin, and one file per snapshot, snap-NAME.json:
//
//	{"version":1,"origin":"/dev/vdb","origin_id":"8f3c…","session":12}
//	{"version":2,"name":"snap1","phase":"ready","uuid":"5b1e…",
//	 "backing_path":"/var/lib/nbdsnap-stores/data/snap1.cow","cluster_size":65536,
//	 "created":"2026-…","origin":{"kind":"block","size":…,"keys":{"serial":"…"}},
//	 "session":12}
//
// A rollback under way adds rollback.progress, which is not a JSON record:
// see rollback.go.
//
// Every file is replaced atomically: written to a temporary name, fsynced,
// renamed over the old name, and the directory fsynced, so a crash leaves
// either the old or the new record, never a torn one, and a record that a
// command reported is on disk.
//
// # What a record promises
//
// A snapshot record is the daemon's durable word about one snapshot; the
// store file alone is never trusted, because it cannot know what happened to
// the origin while it was not open. Its fields:
//
//   - phase: "creating" from before the store exists until the create
//     instant is past and the store is in place; "ready" after; "clearing"
//     from the first durable step of a clear. A restart rolls back a
//     creating record (the client was never told of success) and finishes a
//     clearing one; only a ready record is ever served.
//   - uuid: the store's UUID, chosen before the store is created. A store
//     file is only reopened, marked, wiped or deleted after its header
//     proved it has this UUID, so a file someone else put at the recorded
//     path (or a device's previous store) is never taken for it.
//   - origin: the origin's identity when the snapshot was taken (package
//     devinfo). A restart that finds another file or disk at the origin's
//     path does not serve the snapshot.
//   - session: the last daemon session that kept copy-on-write for the
//     snapshot (or served no origin it belongs to). origin.json's session is
//     the last session that served the origin; a ready record older than it
//     missed copy-on-write for a whole session (its record was damaged and
//     repaired by hand, or restored from a backup) and is invalid.
//   - bookmark: the snapshot was turned into a bookmark (clear
//     --bookmark): its store dropped the image and only records which
//     blocks the origin writes; it is reopened like a snapshot but not
//     exported. Written after the store became a bookmark, so a ready
//     record whose store is a bookmark is one a crash interrupted, and a
//     restart completes it.
//   - invalid, reason: the snapshot turned invalid; written before origin
//     writes go on without copying for it (the engine's RecordInvalid hook,
//     and a restart that cannot reopen the store). A record marked invalid
//     stays so until it is removed: put keeps the mark.
//
// Version 1 records (before phase, uuid, origin and session) load as ready,
// with no UUID (their store is recognised by name and origin ID, and the
// header's UUID is adopted) and no identity (the first restart records the
// identity of what it finds at the origin's path); they are rewritten as
// version 2 then. A record of a newer version, or one that does not parse, is
// listed as damaged and never served; it does not stop the daemon.

const (
	originVersion = 1
	recordVersion = 2
)

// Record phases.
const (
	phaseCreating = "creating"
	phaseReady    = "ready"
	phaseClearing = "clearing"
)

type originRecord struct {
	Version  int    `json:"version"`
	Origin   string `json:"origin"`
	OriginID string `json:"origin_id"`
	// Session is the number of the last daemon session that served the
	// origin (0 before sessions were recorded).
	Session uint64 `json:"session,omitempty"`
}

type snapRecord struct {
	Version     int               `json:"version"`
	Name        string            `json:"name"`
	Phase       string            `json:"phase,omitempty"`
	UUID        string            `json:"uuid,omitempty"`
	BackingPath string            `json:"backing_path"`
	Device      bool              `json:"device,omitempty"` // the store is a block device: wiped, never deleted
	ClusterSize int               `json:"cluster_size"`
	Transient   bool              `json:"transient"`
	MaxSize     int64             `json:"max_size"`
	Created     time.Time         `json:"created"`
	Origin      *devinfo.Identity `json:"origin,omitempty"`
	Session     uint64            `json:"session,omitempty"`
	// Invalid: the snapshot turned invalid, for Reason; never served
	// again. See the comment at the top.
	Invalid bool   `json:"invalid,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// Bookmark: the snapshot's image was dropped; it records changed
	// blocks only and is not exported. See the comment at the top.
	Bookmark bool `json:"bookmark,omitempty"`
}

// storeUUID is the record's store UUID; zero for a version 1 record.
func (r snapRecord) storeUUID() uuid.UUID {
	id, err := uuid.Parse(r.UUID)
	if err != nil {
		return uuid.UUID{}
	}
	return id
}

// loaded is one snap-*.json file as read at startup: a record, or why it
// could not be used.
type loaded struct {
	file    string // base name, snap-NAME.json
	name    string // NAME, from the file name
	rec     snapRecord
	damaged error
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

// openState creates dir if needed and returns its origin record, recording
// a fresh one on first use. A directory recorded for another origin path is
// refused, unless moved (the user said the origin moved), which records the
// new path.
func openState(dir, origin string, moved bool) (*stateDir, originRecord, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, originRecord{}, fmt.Errorf("state dir: %w", err)
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
	path := filepath.Join(dir, originFile)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		rec = originRecord{Version: originVersion, Origin: origin, OriginID: uuid.NewString()}
		if err := s.write(originFile, rec); err != nil {
			return nil, originRecord{}, err
		}
		return s, rec, nil
	case err != nil:
		return nil, originRecord{}, fmt.Errorf("state dir: %w", err)
	}
	if err := json.Unmarshal(b, &rec); err != nil || rec.OriginID == "" {
		if err == nil {
			err = errors.New("no origin_id")
		}
		return nil, originRecord{}, fmt.Errorf("state dir: %s is damaged (%v): it ties the snapshot records to their origin, so none can be trusted without it; move the directory aside to start afresh", path, err)
	}
	if rec.Version != originVersion {
		return nil, originRecord{}, fmt.Errorf("state dir %s has version %d, this nbdsnap reads %d", dir, rec.Version, originVersion)
	}
	if rec.Origin != origin {
		if !moved {
			return nil, originRecord{}, fmt.Errorf("state dir %s belongs to origin %s, not %s (if the origin moved, start with --accept-moved-origin)", dir, rec.Origin, origin)
		}
		rec.Origin = origin
		if err := s.write(originFile, rec); err != nil {
			return nil, originRecord{}, err
		}
	}
	return s, rec, nil
}

// setSession records durably that session n serves the origin.
func (s *stateDir) setSession(rec originRecord, n uint64) error {
	rec.Session = n
	return s.write(originFile, rec)
}

func snapFile(name string) string { return snapPrefix + name + snapSuffix }

// records reads every snapshot record, sorted by creation time (damaged
// ones last, by name). Only a failure to read the directory itself is an
// error.
func (s *stateDir) records() ([]loaded, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	var out []loaded
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, snapPrefix) || !strings.HasSuffix(n, snapSuffix) {
			continue
		}
		l := loaded{file: n, name: strings.TrimSuffix(strings.TrimPrefix(n, snapPrefix), snapSuffix)}
		l.rec, l.damaged = s.read(n)
		out = append(out, l)
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if (a.damaged == nil) != (b.damaged == nil) {
			return a.damaged == nil
		}
		if !a.rec.Created.Equal(b.rec.Created) {
			return a.rec.Created.Before(b.rec.Created)
		}
		return a.name < b.name
	})
	return out, nil
}

// read reads and checks the snapshot record in file.
func (s *stateDir) read(file string) (snapRecord, error) {
	path := filepath.Join(s.dir, file)
	b, err := os.ReadFile(path)
	if err != nil {
		return snapRecord{}, fmt.Errorf("state dir: %w", err)
	}
	var r snapRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return snapRecord{}, fmt.Errorf("state record %s does not parse: %w", path, err)
	}
	switch {
	case r.Version > recordVersion:
		return snapRecord{}, fmt.Errorf("state record %s has version %d, written by a newer nbdsnap (this one reads up to %d)", path, r.Version, recordVersion)
	case r.Version < 1:
		return snapRecord{}, fmt.Errorf("state record %s has no version", path)
	case snapFile(r.Name) != file:
		return snapRecord{}, fmt.Errorf("state record %s names snapshot %q", path, r.Name)
	case r.BackingPath == "" || !filepath.IsAbs(r.BackingPath):
		return snapRecord{}, fmt.Errorf("state record %s has backing path %q", path, r.BackingPath)
	}
	if r.Version == 1 {
		r.Phase = phaseReady
	}
	switch r.Phase {
	case phaseCreating, phaseReady, phaseClearing:
	default:
		return snapRecord{}, fmt.Errorf("state record %s has phase %q", path, r.Phase)
	}
	if r.UUID != "" && r.storeUUID() == (uuid.UUID{}) {
		return snapRecord{}, fmt.Errorf("state record %s has store UUID %q", path, r.UUID)
	}
	return r, nil
}

// put writes a snapshot's record. A record on disk marked invalid keeps its
// mark and reason: the engine may have turned the snapshot invalid (and
// marked its record) while its owner was about to rewrite the record.
func (s *stateDir) put(r snapRecord) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r.Version = recordVersion
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
	r.Version = recordVersion
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

// removeFile deletes a snapshot record file that could not be read (so
// its name may not match what it holds) durably.
func (s *stateDir) removeFile(file string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Remove(filepath.Join(s.dir, file)); err != nil && !errors.Is(err, os.ErrNotExist) {
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
		return fmt.Errorf("sync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
