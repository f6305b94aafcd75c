package control

import "time"

// APIVersion is the version of the paths and bodies in this package. A
// change that an older client would misread bumps it (and the /vN prefix).
const APIVersion = "1"

// Header names on every response.
const (
	HeaderAPI     = "Nbdsnap-Api"     // APIVersion of the daemon
	HeaderVersion = "Nbdsnap-Version" // the daemon's build version
)

// Paths of the v1 API.
const (
	PathStatus    = "/v1/status"    // GET: Status
	PathSnapshots = "/v1/snapshots" // GET: []SnapshotInfo; POST CreateRequest: SnapshotInfo
	// PathSnapshots + "/" + name: GET SnapshotInfo (?settled=1: after any
	// create or clear under way has finished); DELETE (?force=1) clears it,
	// answering ClearResult. PathSnapshots + "/" + name + "/bookmark":
	// POST (?force=1) turns it into a bookmark, answering SnapshotInfo.
	// PathSnapshots + "/" + name + "/rollback": POST RollbackRequest starts
	// rolling the origin back to it, answering RollbackStatus.
	PathDiff = "/v1/diff" // GET ?base=B&target=S (no target: the origin): Diff
)

// Snapshot states.
const (
	StateValid   = "valid"
	StateInvalid = "invalid"
)

// Status describes a daemon and all its snapshots.
type Status struct {
	Name       string   `json:"name"`        // the daemon's name, also the origin export's name
	Origin     string   `json:"origin"`      // path of the origin file or block device
	OriginSize int64    `json:"origin_size"` // bytes
	Version    string   `json:"version"`     // the daemon's build version
	PID        int      `json:"pid"`
	Listen     []string `json:"listen"`    // NBD listeners, unix:PATH or tcp:HOST:PORT
	StateDir   string   `json:"state_dir"` // where snapshots are recorded
	// OriginIdentity is the origin's stable identity (kernel identifiers
	// and size of a block device; file system, inode, birth time and size
	// of a file): what a restart checks before it serves a snapshot.
	OriginIdentity string         `json:"origin_identity"`
	Started        time.Time      `json:"started"`
	Conns          int            `json:"open_connections"` // NBD connections to the origin export
	Snapshots      []SnapshotInfo `json:"snapshots"`
	// Rollback is the rollback under way, or the last one this daemon
	// ran; null if none.
	Rollback *RollbackStatus `json:"rollback"`
	// HeldWrites are the origin writes answered before the commit of
	// their persistent snapshots and not yet on the origin.
	HeldWrites HeldWrites `json:"held_writes"`
}

// HeldWrites describes the held writes.
type HeldWrites struct {
	BudgetBytes int64 `json:"budget_bytes"` // the most they may cost; 0: writes are never held
	Bytes       int64 `json:"bytes"`        // what those held now cost (payload and 8 KiB each)
	Writes      int64 `json:"writes"`       // held now
	Total       int64 `json:"total"`        // held since the daemon started
	// Failed: a held write could not be written to the origin; every
	// FLUSH fails from then on.
	Failed bool `json:"failed"`
}

// Rollback states.
const (
	RollbackRunning = "running" // the origin shows the snapshot; clusters are being copied back
	RollbackFailed  = "failed"  // some clusters could not be copied back: see Error
	RollbackDone    = "done"    // complete, and the snapshot cleared if consume was asked
)

// RollbackRequest asks for the origin to be rolled back to a snapshot.
type RollbackRequest struct {
	// Force rolls back although NBD clients have the origin export open
	// (their caches then hold data the rollback replaced).
	Force bool `json:"force"`
	// Consume clears the snapshot once the rollback is complete.
	Consume bool `json:"consume"`
	// Rate bounds the background copy, in bytes per second (0: none).
	Rate int64 `json:"rate"`
}

// RollbackStatus describes a rollback.
type RollbackStatus struct {
	Snapshot string    `json:"snapshot"`
	UUID     string    `json:"uuid"` // the snapshot's store
	State    string    `json:"state"`
	Error    string    `json:"error"` // why it failed; "" otherwise
	Started  time.Time `json:"started"`
	// Finished is when it became done; zero before.
	Finished       time.Time `json:"finished"`
	Consume        bool      `json:"consume"`
	Rate           int64     `json:"rate"`
	TotalBytes     int64     `json:"total_bytes"`     // what the snapshot copied, to copy back
	RemainingBytes int64     `json:"remaining_bytes"` // never increases
}

// SnapshotInfo describes one snapshot. Every field is always present in
// its JSON, empty or zero when it does not apply, so that a script can read
// any key without first testing whether it is there.
type SnapshotInfo struct {
	Name           string    `json:"name"`
	Origin         string    `json:"origin"`  // the daemon's (origin export's) name
	UUID           string    `json:"uuid"`    // the backing store's UUID
	State          string    `json:"state"`   // StateValid or StateInvalid
	Reason         string    `json:"reason"`  // why it is invalid; "" while valid
	Created        time.Time `json:"created"` // the create instant, RFC 3339 in JSON
	Persistent     bool      `json:"persistent"`
	Served         bool      `json:"served"` // exported over NBD (false once invalid after a restart)
	Size           int64     `json:"size"`   // bytes, the origin's size at the create instant
	ClusterSize    int       `json:"cluster_size"`
	ClustersTotal  int64     `json:"clusters_total"`
	ClustersCopied int64     `json:"clusters_copied"`
	BackingPath    string    `json:"backing_path"`
	BackingBytes   int64     `json:"backing_bytes"`
	CacheBytes     int64     `json:"cache_bytes"` // the copy-on-write cache (0 when not open)
	MaxSize        int64     `json:"max_size"`    // 0 = unlimited
	// StoreFree is how many bytes the backing store may still grow: the
	// smaller of what MaxSize leaves and FSFree; -1 when neither is known
	// (a block device store without MaxSize, or a snapshot not open).
	StoreFree int64 `json:"store_free"`
	// FSFree is the free space of the file system holding a file store;
	// -1 for a block device store or when unknown.
	FSFree int64 `json:"fs_free"`
	Conns  int   `json:"open_connections"` // NBD connections to this snapshot's export
	// CreatePauseMicros is how long the create instant held origin writes
	// (0 for a snapshot reopened after a restart).
	CreatePauseMicros int64 `json:"create_pause_us"`
	// Bookmark: the snapshot's image was dropped (clear --bookmark); it
	// only records which blocks the origin writes, so that later snapshots
	// can report the changes since it. It is not exported.
	Bookmark bool `json:"bookmark"`
	// Granularity is the size, in bytes, of the blocks changes since this
	// snapshot are counted in (its cluster size).
	Granularity int `json:"granularity"`
	// DiffBases names the snapshots and bookmarks this snapshot can report
	// exact changed blocks against (`nbdsnap diff BASE SNAP`, the
	// qemu:dirty-bitmap:BASE context of its export), oldest first.
	DiffBases []string `json:"diff_bases"`
	// Generation identifies this snapshot's create instant for good (its
	// store's UUID): a backup tool that recorded it knows whether a base
	// of the same name is still the one it copied.
	Generation string `json:"generation"`
	Stats      Stats  `json:"stats"`
}

// Diff is the answer to a diff: the byte ranges that may have changed
// between Base's create instant and Target's (or now, for the origin),
// at Granularity.
type Diff struct {
	Base         string  `json:"base"`
	Target       string  `json:"target"` // a snapshot, or the origin's name
	Granularity  int     `json:"granularity"`
	ChangedBytes int64   `json:"changed_bytes"`
	Ranges       []Range `json:"ranges"`
}

// Range is a byte range.
type Range struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// Stats are the copy-on-write engine's counters for one snapshot.
type Stats struct {
	CowCalls       int64 `json:"cow_calls"`
	ClustersCopied int64 `json:"clusters_copied"`
	CacheFullWaits int64 `json:"cache_full_waits"`
	MapReads       int64 `json:"map_reads"`
	MapWrites      int64 `json:"map_writes"`
	BytesCopied    int64 `json:"bytes_copied"`
	Batches        int64 `json:"batches"`
	Syncs          int64 `json:"syncs"`
}

// CreateRequest asks for a snapshot.
type CreateRequest struct {
	Name        string `json:"name"`
	BackingPath string `json:"backing_path"`           // absolute: a file that must not exist yet, or a block device
	ClusterSize int    `json:"cluster_size,omitempty"` // bytes; 0 = engine default (64 KiB)
	Transient   bool   `json:"transient,omitempty"`    // not kept across a daemon restart
	MaxSize     int64  `json:"max_size,omitempty"`     // backing store limit in bytes; 0 = none
	// Force uses a block device as the backing store even though it holds
	// a file system, a partition table or other data (which is destroyed).
	Force bool `json:"force,omitempty"`
	// UUID, if set, names the new store; a client that may lose the answer
	// asks for the snapshot afterwards (settled) and knows by the UUID
	// whether its create is the one that happened.
	UUID string `json:"uuid,omitempty"`
	// TimeoutMillis bounds the wait for the create instant (origin writes
	// in flight, the origin sync, the store header): if it is not reached
	// in time, the create is abandoned and nothing is created. Once the
	// instant is past, the create completes. 0: no bound but the
	// request's own (the connection closing abandons it the same way).
	TimeoutMillis int64 `json:"timeout_ms,omitempty"`
}

// ClearResult is the answer to a clear.
type ClearResult struct {
	// Kept, when not empty, says what was found at the backing path and
	// left in place because it is not the snapshot's store (or a block
	// device that could not be wiped).
	Kept string `json:"kept,omitempty"`
}

// ErrorBody is the JSON body of every non-2xx response.
type ErrorBody struct {
	Error string `json:"error"` // one line, for humans
	Code  string `json:"code"`  // not_found, exists, busy, invalid, unavailable, internal
}

// RunDir is where daemons put their sockets by default.
const RunDir = "/run/nbdsnap"

// DefaultPath is the control socket of the daemon called name when no
// --control is given.
func DefaultPath(name string) string { return RunDir + "/" + name + ".ctl" }
