// Package cow is nbdsnap's copy-on-write engine: NetBSD's fss(4)
// (sys/dev/fss.c) rebuilt in userspace, in front of one origin file or
// block device, with any number of snapshots, each with its own backing
// store (internal/backstore).
//
// # Main types
//
// [Engine] is the read-write proxy of the origin: ReadAt, WriteAt, Trim,
// Zero and Flush have the shapes of the NBD layer's backend interfaces.
// Create, Reopen and Clear manage snapshots; Close ends the engine, and
// [Engine.Abandon] ends a stop that ran out of time without waiting for the
// stores. [Snapshot] is one frozen image: its ReadAt serves the read-only
// export, its Info reports state and statistics (fss_stat).
//
// # Mechanism (fss)
//
// A snapshot divides the origin into clusters (a power of two, default
// 64 KiB, raised so that there are at most 2^24; the last may be partial),
// keeps a copied bitmap (sc_copied), a cache of slots FREE / BUSY / VALID
// (sc_cache; a byte budget with fss's slot counts as a floor), and a writer
// goroutine (fss_bs_thread) that drains VALID slots to the store.
//
// An origin-modifying request (write, trim, write-zeroes) first runs
// copy-on-write (fss_copy_on_write → fss_read_cluster): for each cluster it
// touches that a snapshot has not copied, it reserves a BUSY slot in every
// snapshot that needs the cluster, reads the cluster from the origin once,
// and publishes the one (reference-counted) buffer to all of them as VALID,
// setting their copied bits. A request that finds the cluster BUSY waits
// for that copy (cowwait2); one that finds the cache full waits for the
// writer to free a slot (cowwait3: backpressure). Then it modifies the
// origin. Beyond fss:
//
//   - Persistent mode (the default): every pending cluster goes into one
//     store commit (data and map, one fdatasync: group commit), and an
//     origin modification waits until the commit holding its clusters
//     returned. A crash therefore never leaves an origin cluster modified
//     whose old data is not findable in the store; Reopen rebuilds the
//     snapshot after a restart. A request that waits for a commit runs it
//     itself when none is in progress (saving two goroutine handoffs); when
//     syncs are slow (a disk), the committer lingers briefly for the requests
//     the previous commit released, so that concurrent writers share syncs
//     instead of alternating in two halves.
//   - Held writes (held.go): with a held-writes log (UseHeldLog), a plain
//     write whose commit a slow store would make it wait for is answered
//     once its old clusters are cached, and its origin write is held until
//     the commit, which is then due lazily and gathers many clusters. Reads,
//     block status, overlapping writes, FLUSH and changes of the snapshot
//     set wait for held writes; the log lets the owner replay them after a
//     crash of the process (heldlog.go).
//   - Transient mode is exactly fss: the modification waits only for the copy
//     into the cache, the store is never synced and cannot be reopened.
//   - Snapshots sharing a cluster size share one origin read per cluster.
//
// A snapshot read reads the origin and overlays the copied clusters from
// the cache or the store; [Snapshot.ReadAt] says why that is race-free.
//
// # Changed blocks and bookmarks
//
// A persistent store lists its clusters in commit order, so a snapshot
// records, at its create instant, how many entries every older persistent
// snapshot holds (its bases): [Snapshot.Changed] then says which blocks
// changed between a base and the snapshot, [Engine.ChangedSince] which
// changed on the origin since a snapshot, exactly or not at all (dirty.go).
// [Engine.Bookmark] drops a snapshot's image but keeps it recording which
// clusters the origin writes, so later snapshots can still diff against it.
//
// # Rollback
//
// [Engine.Rollback] puts a persistent snapshot's image back onto the origin,
// online: from its return every origin read shows the image (clusters not
// yet restored are read from the snapshot's store), a copier goroutine
// restores the rest, writes to a cluster not yet restored restore it first,
// and a progress file (backstore's "Rollback progress") records which are
// back so that [Engine.ResumeRollback] continues after a crash. Its
// invariants and crash argument are in rollback.go.
//
// # Concurrency
//
// All methods are safe for concurrent use. The engine's gate (a RWMutex) is
// held shared by each origin-modifying request for its whole duration and
// exclusively by Create, Reopen, Clear, Bookmark, Rollback and Close: that
// is the create instant (stop admitting, drain, sync the origin, create the
// store, establish copy-on-write, resume). Requests do their I/O under no
// mutex. A snapshot's state is in three parts, each with its own mutex held
// only for bookkeeping: its cache (slots and copied bitmap), its committer
// (the commit queue, the writer, the commit policy) and its invalidation
// state. Requests on different clusters do not wait for each other except
// for cache space and shared commits. Lock order: gate, then one snapshot's
// locks at a time, in creation order of the snapshots, within a snapshot
// cache, committer, invalidation; Engine.mu is a leaf.
//
// # Invariants
//
//   - The copied bit of a cluster is set only once its old data is complete
//     in a VALID slot, and before any request may modify that cluster of the
//     origin; it is never cleared.
//   - In persistent mode no origin modification of a cluster is issued
//     before the cluster's commit returned.
//   - A slot leaves the cache only after the store can find its cluster (or
//     the snapshot is invalid).
//   - Store writes run one at a time, on the writer goroutine or on a
//     request leading a commit, except that a held writes' commit may start
//     while one other commit is in the store (the store orders their
//     metadata); a commit's clusters count as durable only once every
//     commit before it returned too. Clear and Close stop the writer and
//     wait for the commits in progress before closing the store.
//   - In persistent mode a snapshot that failed keeps holding origin
//     modifications back until its invalidation was (tried to be) recorded
//     in the store and in the owner's record (EngineOptions.RecordInvalid),
//     so a snapshot whose owner reopens it as valid never lies unless both
//     records failed.
//   - [Engine.Abandon] (a stop that ran out of time) never touches a store
//     and releases a persistent snapshot only once the owner's record holds
//     its invalidation; Close then leaves that snapshot's store open rather
//     than wait for a store call that may never return.
//
// # Failure (fss_error)
//
// A store error, a full store or an origin read error while copying marks
// the snapshot invalid with a reason (recorded in the store header, best
// effort). Origin requests never fail because of a snapshot: waiters are
// released and copy-on-write skips the invalid snapshot. Its reads then fail
// with an error matching [ErrInvalid] and syscall.EIO. Other snapshots are
// not affected.
//
// # Caveats
//
//   - Waits inside a request (cache space, commits) are not interruptible by
//     its context; they are bounded by the writer, which either commits or
//     invalidates the snapshot, or by Abandon. A request that leads a
//     commit itself (persistent mode) is inside the store call: if that
//     call never returns, neither does the request, Abandon or not.
//   - Snapshots of different cluster sizes each read the origin for
//     themselves.
//   - Reopen assumes the origin was not modified while no engine ran.
//   - If the invalidation of a persistent snapshot can be written neither
//     to the store (its device is dead) nor by EngineOptions.RecordInvalid,
//     a reopen after a crash would serve stale data; the engine logs this at
//     error level.
//   - Where no disk hides it (origin and store on tmpfs), a first write of
//     a cluster costs a good deal more than a plain write: besides the new
//     data, the old cluster is read and written to the store (persistent:
//     with its checksum, and synced before the origin write). `make
//     bench-engine` measures it, with the floor those copies set
//     (BenchmarkCopyBound); the figures are in bench/results.
//   - The engine does not close the origin; it owns the stores of live
//     snapshots and closes them on Clear and Close.
package cow
