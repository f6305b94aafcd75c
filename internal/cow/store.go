package cow

import (
	"time"

	"github.com/google/uuid"
)

// clusterStore is what the engine needs from a backing store. The
// production implementation wraps *backstore.Store (backstore.go); tests can
// substitute their own. The mutating methods are never called
// concurrently, but for two commits (see committer): the second may start
// while the first runs, and a store that keeps crash images must write the
// second's metadata only after the first's returned, as backstore.Store
// does. invalidate, bookmark and close run alone; readCluster runs
// concurrently with commit.
type clusterStore interface {
	// commit stores a batch of clusters. Persistent stores: when it
	// returns nil every cluster of the batch is durable and findable
	// after a crash (one sync). Transient stores: findable, not durable.
	// sync is how long the batch's sync took (0 if there was none).
	commit(batch []storeCluster) (sync time.Duration, err error)
	// readCluster copies bytes [off, off+len(p)) of a committed cluster
	// into p; ok is false if the cluster is not in the store.
	readCluster(index uint32, p []byte, off int) (ok bool, err error)
	forEachCopied(fn func(index uint32))
	// entry is cluster index's entry number (commit order), count the
	// entries committed; see "Changed blocks" in backstore's format.go.
	entry(index uint32) (n uint32, ok bool)
	count() uint32
	// bookmark drops the store's data: later commits record clusters
	// only. Called like commit, never concurrently with it.
	bookmark() error
	header() storeHeader
	invalidate(reason string) error
	bytes() int64
	// close closes the store and its file; release closes the store but
	// leaves the file to the caller (a store Reopen refuses).
	close() error
	release() error
}

// storeCluster is one cluster of a commit batch; data is a full cluster
// (the tail of a partial last cluster is zero).
type storeCluster struct {
	index uint32
	data  []byte
}

// storeHeader is the part of a store header the engine uses.
type storeHeader struct {
	UUID        string
	Name        string
	Created     time.Time
	ClusterSize int
	OriginSize  int64
	OriginID    string
	Persistent  bool
	Valid       bool
	Reason      string
	Bookmark    bool
	Bases       []storeBase
}

// storeBase is a base recorded in a store: when it was created, the store
// UUID held Entries entries.
type storeBase struct {
	UUID    string
	Entries uint32
}

// storeOptions are the parameters of a new store.
type storeOptions struct {
	Name        string
	ClusterSize int
	OriginSize  int64
	OriginID    string
	Persistent  bool
	MaxSize     int64
	Created     time.Time
	UUID        uuid.UUID // zero: random
	Bases       []storeBase
}
