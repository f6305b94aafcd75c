// Package backstore is the on-disk store of the clusters a snapshot copied
// out of its origin before the origin overwrote them (fss(4)'s backing
// store), kept on a regular file (sparse, growing, optionally limited by
// Options.MaxSize) or a block device (fixed size).
//
// A store has a versioned header in two checksummed slots (the one with the
// higher generation wins, so a torn header write never loses the store),
// and data slots holding the copies in commit order. A persistent store
// also keeps a metadata log saying which cluster each data slot holds;
// Commit writes a batch's data and metadata and then syncs once, so when it
// returns nil the batch is durable and Open will find it after a crash,
// while a batch torn by a crash is detected by checksums and dropped as a
// whole ([Store.Recovery] lists what was dropped). Close records a clean
// mark in the header, so that a store closed cleanly whose committed state
// was damaged since opens invalid ("store corrupt: …") rather than silently
// losing the damaged batch. The byte layout and the argument for crash
// safety are in format.go. A transient store writes data only, never syncs, and cannot be
// reopened; its map lives only in memory.
//
// Entries are numbered in commit order ([Store.Entry]), which is what lets a
// later store record how far an earlier one had got (its bases) and so
// answer "what changed between the two"; a store can drop its data and
// become a bookmark ([Store.Bookmark]) that keeps recording clusters only.
// See "Changed blocks" in format.go.
//
// Main types: [Store] (Create, Open, Commit, ReadCluster, Invalidate),
// [Header], [Check] and its [Report].
//
// Concurrency: one committer at a time (Commit serialises itself); reads
// (ReadCluster, Copied, ForEachCopied) run concurrently with it and see a
// cluster only once its Commit has completed.
//
// Reads are verified: the CRC32C of every committed cluster is kept in
// memory (in a transient store too, which has no metadata on disk), and
// ReadCluster checks the whole cluster against it on every read, so a store
// damaged under a live snapshot fails with ErrChecksum rather than serving
// wrong bytes. [Identify], [MarkInvalid] and [Wipe] act on a store file that
// is not open, only after its UUID proved it is the store meant.
//
// Memory: the map from cluster to data slot is a bitmap plus a packed slot
// list per 1024-cluster chunk, about 2.5 MiB for 2^24 clusters plus ~4–6
// bytes per copied cluster (see index.go and TestIndexMemory), and 4 bytes
// per copied cluster for its checksum.
//
// Caveats: Open verifies the data checksums of the newest batch only;
// corruption of older data is found by Check, or by the first read of the
// damaged cluster. After an unclean shutdown, damage to the newest
// committed batch looks like a batch torn in flight; Open given the origin
// tells them apart (the origin no longer holds a committed batch's
// clusters) and opens the store invalid rather than lose the batch, except
// when none of that batch's metadata survived (see "The clean mark" in
// format.go). After a Commit fails with an I/O error the store takes no more
// batches (ErrFailed): whether that batch's writes are durable is unknown
// until a reopen.
package backstore
