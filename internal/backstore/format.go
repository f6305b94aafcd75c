package backstore

// On-disk format, versions 1 and 2. Every integer is little-endian; every
// checksum is CRC32C (Castagnoli). Offsets are in bytes. Version 2 adds
// the base table and the bookmark flag (see "Changed blocks" below) and is
// written only by a store that uses them, so a store without either stays
// version 1 and opens with programs that predate version 2.
//
// # Layout
//
//	0          4096        8192                       DataStart
//	+----------+-----------+--------------------------+------------------------------+
//	| header   | header    | metadata region          | data slots: slot k at        |
//	| slot 0   | slot 1    | (persistent stores only) | DataStart + k*ClusterSize    |
//	+----------+-----------+--------------------------+------------------------------+
//
// The metadata region holds MetaBlocks = ceil(MaxClusters/505) logical
// blocks, MaxClusters = ceil(OriginSize/ClusterSize); logical block L has two
// physical 4096-byte slots, at 8192 + (2L+s)*4096 for s = 0, 1. DataStart is
// the end of the metadata region rounded up to a multiple of ClusterSize (a
// transient store has no metadata region: DataStart = 8192 rounded up).
// On a regular file everything not yet written is a hole.
//
// # Header slot (4096 bytes; slots 0 and 1 have the same layout)
//
//	off   len   field
//	0     8     magic "NBSSTORE"
//	8     4     format version (1 or 2)
//	12    4     flags: bit 0 persistent, bit 1 fixed size (block device),
//	            bit 2 bookmark (version 2, persistent only); others 0
//	16    8     generation: the slot with the higher valid generation is current
//	24    16    store UUID (binds metadata blocks to this store)
//	40    4     cluster size (power of two, 512 … 1 MiB)
//	44    4     state: 1 valid, 2 invalid
//	48    8     origin size (> 0)
//	56    8     creation time, Unix nanoseconds
//	64    8     max size (0: no limit but the file system or device)
//	72    8     batch base: every batch of the current session is numbered at or
//	            above it, every batch of an earlier session below it
//	80    8     DataStart (cross-checks the geometry computed from the fields above)
//	88    2     name length (≤ 255)
//	90    2     origin identity length (≤ 1024)
//	92    2     invalidation reason length (≤ 2048)
//	94    2     zero
//	96    8     clean batch: the last committed batch at a clean Close
//	            (0 when the store held no batch then, and when not clean)
//	104   4     clean count: entries committed at that Close (0 when not clean)
//	108   4     clean mark: 1 closed cleanly at (clean batch, clean count);
//	            0 not recorded — open for writing, crashed, or written
//	            before this field existed; other values are corrupt
//	112   16    zero
//	128   256   name, then zeros
//	384   1024  origin identity, then zeros
//	1408  2048  invalidation reason, then zeros
//	3456  2     base count n ≤ 31 (version 2; 0 in version 1)
//	3458  2     zero
//	3460  20n   bases: store UUID (16), entries (4)
//	…           zero up to 4092
//	4092  4     CRC32C of bytes 0 … 4091
//
// The magic and the version stay at offsets 0 and 8 in every future version,
// so that an old program can refuse a newer store (ErrVersion) before
// interpreting anything else.
//
// # Metadata block (4096 bytes)
//
//	off   len   field
//	0     4     magic "NBSM"
//	4     4     logical block number L
//	8     8     batch number (≥ 1) of the Commit that wrote this version
//	16    16    store UUID
//	32    4     first entry the batch added (F)
//	36    4     entries in the store after the batch (T), F < T ≤ MaxClusters
//	40    4     entries in this block: min(T, 505(L+1)) − 505L
//	44    4     zero
//	48    4040  505 entries of 8 bytes, for data slots 505L … 505L+504:
//	            cluster index u32, CRC32C of the cluster's data u32;
//	            unused entries zero
//	4088  4     zero
//	4092  4     CRC32C of bytes 0 … 4091
//
// A block version is valid when its magic, CRC, L, UUID and counts check; the
// batch that wrote it touched it (505L < T and 505(L+1) > F).
//
// # Changed blocks: bases and bookmarks (version 2)
//
// Data slots are filled in commit order, so a store's entries say not only
// which clusters the origin overwrote since the create instant but also in
// which order: entry k was committed before entry k+1. The owner commits a
// cluster's copy before it lets the origin write of that cluster go on, and
// a create instant waits for every origin write in flight. So when snapshot
// S is created while snapshot B (same origin) holds n entries, B's entries
// 0 … n−1 are exactly the clusters (in B's cluster size) written between
// B's create instant and S's. S's header records that as a base: B's UUID
// and n. The changed blocks between B and S are then "cluster c of B with
// entry number below n", read from B's in-memory map; no bitmap per pair is
// stored. A base holds only while B's store is alive and valid; the owner
// checks that before it reports anything.
//
// A bookmark is a store whose data was dropped (flag bit 2): its entries
// keep growing with the clusters written to the origin, committed (and
// synced) before the origin write like a snapshot's, but no data is
// written, every CRC is zero, and recovery and Check verify no data. It
// lets a later snapshot name it as a base after its image is gone.
// Turning a store into a bookmark is one header write (the flag, version
// 2); the data region is then punched out (a crash before that leaves the
// bytes allocated until the next Open punches them).
//
// # Rollback progress (a file of its own, version 1)
//
// A rollback writes a persistent snapshot's copied clusters back onto the
// origin (the engine's Engine.Rollback). Its owner keeps a progress file
// next to its records:
//
//	0          4096
//	+----------+---------------------------------------------------+
//	| header   | restored bitmap: ceil(clusters/8) bytes; bit c    |
//	|          | (byte c/8, bit c%8) set: cluster c is restored    |
//	+----------+---------------------------------------------------+
//
//	off   len   field
//	0     8     magic "NBSROLLB"
//	8     4     version 1
//	12    4     flags: bit 0 consume (the owner clears the snapshot when
//	            the rollback is complete); others 0
//	16    16    the source store's UUID
//	32    4     cluster size (the source store's)
//	36    4     clusters: ceil(origin size / cluster size)
//	40    8     origin size
//	48    4     entries: the source store's entry count at the rollback
//	            instant; the clusters to restore are those whose entry
//	            number is below it (see "Changed blocks"): the clusters
//	            copied before the instant, and not those copied after it,
//	            which hold writes made on top of the rollback
//	52    4     zero
//	56    8     rollback instant, Unix nanoseconds
//	64    8     rate bound, bytes per second (0: none)
//	72    …     zero up to 508
//	508   4     CRC32C of bytes 0 … 507
//	512   3584  zero
//
// The commit point is the header: the bitmap (all clear) is made durable
// first, then the header, so a file shorter than the header or whose
// header is all zeros holds no rollback (the command never answered), and
// any other header that does not check is damage. The fields and their CRC
// fit in the first 512-byte sector, which a disk writes whole, so a crash
// cannot tear the commit point: the rest of the header is zeros before and
// after. (The magic and the version are checked before the CRC, so that a
// newer format is refused as such.) A bit is set only after
// the cluster's restored data was synced to the origin, so a bit never says
// restored of data a crash may still lose; the bitmap is written by whole
// 4096-byte pages and bits are never cleared, so a page torn by a crash
// holds, sector by sector, the old bits or a superset of them. The
// rollback is complete when entries bits are set; that needs no store, so
// an owner can finish a complete rollback whose snapshot is gone.
//
// Worked example (testdata/progress-v1.golden, built by TestProgressGolden):
// a rollback from a store with the UUID and geometry of the store example
// below (4096-byte clusters, a 64 KiB origin: 16 clusters) holding 5
// entries, started 2026-11-24 12:00 UTC, consume set, rate bound 64 MiB/s,
// after clusters 3 and 9 were marked restored and synced. The file is 4098
// bytes, the header and a 2-byte bitmap:
//
//	00000000  4e 42 53 52 4f 4c 4c 42  01 00 00 00 01 00 00 00  |NBSROLLB........|  magic, version 1, flags: consume
//	00000010  6e 62 73 64 6e 61 70 73  80 00 00 00 00 00 00 01  |nbsdnaps........|  the source store's UUID
//	00000020  00 10 00 00 10 00 00 00  00 00 01 00 00 00 00 00  |................|  cluster size 4096, 16 clusters, origin size 65536
//	00000030  05 00 00 00 00 00 00 00  00 80 8a d2 61 f9 ea 18  |............a...|  5 entries, zero, rollback instant (ns)
//	00000040  00 00 00 04 00 00 00 00                           |........|          rate bound 64 MiB/s (67108864)
//	000001fc  fd 9b 1d ca                                                          CRC32C of 0 … 507
//	00001000  08 02                                             |..|                bitmap: bits 3 (byte 0) and 9 (byte 1)
//
// # Worked example (testdata/store-v1.golden, built by TestGolden)
//
// A persistent store named "snap0" of a 64 KiB origin identified as "disk0",
// 4096-byte clusters, UUID 6e627364-6e61-7073-8000-000000000001, created
// 2026-11-21 12:00 UTC: MaxClusters 16, MetaBlocks 1, the metadata region is
// 8192 … 16383 and DataStart is 16384. Header slot 0 (generation 0; slot 1
// at 4096 is the same with generation 1 and its own CRC):
//
//	00000000  4e 42 53 53 54 4f 52 45  01 00 00 00 01 00 00 00  |NBSSTORE........|  magic, version 1, flags: persistent
//	00000010  00 00 00 00 00 00 00 00  6e 62 73 64 6e 61 70 73  |........nbsdnaps|  generation 0, UUID …
//	00000020  80 00 00 00 00 00 00 01  00 10 00 00 01 00 00 00  |................|  … UUID, cluster size 4096, state valid
//	00000030  00 00 01 00 00 00 00 00  00 80 9d 1e a4 0d ea 18  |................|  origin size 65536, created (ns)
//	00000040  00 00 00 00 00 00 00 00  01 00 00 00 00 00 00 00  |................|  max size 0, batch base 1
//	00000050  00 40 00 00 00 00 00 00  05 00 05 00 00 00 00 00  |.@..............|  DataStart 16384, name 5, id 5, reason 0
//	00000080  73 6e 61 70 30 00 …                               |snap0|            name
//	00000180  64 69 73 6b 30 00 …                               |disk0|            origin identity
//	00000ffc  26 5e 2a 47                                                          CRC32C of 0 … 4091
//
// The first Commit, clusters 3 and 9 (batch 1), writes their data into
// slots 0 and 1 (16384, 20480) and logical block 0 into its physical slot 0
// (8192):
//
//	00002000  4e 42 53 4d 00 00 00 00  01 00 00 00 00 00 00 00  |NBSM............|  magic, block 0, batch 1
//	00002010  6e 62 73 64 6e 61 70 73  80 00 00 00 00 00 00 01  |nbsdnaps........|  UUID
//	00002020  00 00 00 00 02 00 00 00  02 00 00 00 00 00 00 00  |................|  F 0, T 2, 2 entries
//	00002030  03 00 00 00 fd fa 4d 7e  09 00 00 00 51 9b ac 50  |......M~....Q..P|  (3, crc), (9, crc)
//	00002ffc  c0 c8 50 31                                                          CRC32C of 0 … 4091
//
// The second Commit, cluster 5 (batch 2), writes slot 2 (24576) and
// rewrites block 0 — into physical slot 1 (12288), because slot 0 holds the
// durable version:
//
//	00003000  4e 42 53 4d 00 00 00 00  02 00 00 00 00 00 00 00  |NBSM............|  block 0, batch 2
//	00003020  02 00 00 00 03 00 00 00  03 00 00 00 00 00 00 00  |................|  F 2, T 3, 3 entries
//	00003030  03 00 00 00 fd fa 4d 7e  09 00 00 00 51 9b ac 50  |......M~....Q..P|
//	00003040  05 00 00 00 64 86 c6 d0  00 …                     |....d...|
//	00003ffc  e9 71 53 f7
//
// Close then records the clean mark (below): header generation 2, written
// into slot 0 over generation 0 (slot 1 keeps generation 1), which differs
// from the slot shown above only in:
//
//	00000010  02 00 00 00 00 00 00 00  …                        |........|          generation 2
//	00000060  02 00 00 00 00 00 00 00  03 00 00 00 01 00 00 00  |................|  clean batch 2, clean count 3, clean mark 1
//	00000ffc  d4 23 b9 6f                                                          CRC32C of 0 … 4091
//
// testdata/store-v1.golden holds the store after that Close;
// testdata/store-v1-unmarked.golden holds it as written before the clean
// mark existed (slot 0 still generation 0, as shown above), and must keep
// opening: a zero mark reads as "not closed cleanly".
//
// # Commit (persistent) and why a crash anywhere is safe
//
// A Commit of n clusters when the store holds T0 entries, as batch b:
//
//  1. Write each cluster's data into slots T0 … T0+n−1 (fresh slots nobody
//     reads: the in-memory map does not point at them yet), asking the file
//     to start writing each MiB of it back as soon as it is written
//     (write-behind, so that step 3 finds it mostly on the device). That
//     may make data durable before the metadata that refers to it, never
//     after: nothing depends on it until step 3.
//  2. Write every logical block that holds slots T0 … T0+n−1, carrying every
//     entry of the block up to T = T0+n, stamped (b, F=T0, T). The partly
//     filled tail block L0 = T0/505 is written into the physical slot that
//     does NOT hold its current durable version; a block not used before is
//     written into physical slot 0.
//  3. One Sync. Only then are the new entries published to the in-memory map
//     and does Commit return nil.
//
// Nothing of the last committed state is overwritten by steps 1 and 2: data
// goes to fresh slots, the tail block's durable version sits in the other
// physical slot, and blocks before the tail are full and never rewritten.
// So after a crash during Commit b the disk holds every committed version
// plus some subset of b's writes, possibly torn.
//
// The next Commit, b+1, may do its step 1 while b does steps 2 and 3: its
// slots come after b's, and no metadata points at them until its own step
// 2, which starts only once b returned. So a crash then leaves b's writes
// as above plus data nothing refers to: still one batch in flight.
//
// Recovery (Open) reads the metadata region from block 0 up to the first
// logical block with no valid version, and takes as the committed state the
// highest-numbered batch that is complete: every block it wrote has a valid
// version stamped with its number and every entry it added (F … T−1) has
// data whose CRC matches. The last committed batch is always complete (its
// writes were synced and nothing since overwrote them), and a batch numbered
// higher is the one that was in flight, so it is either complete — all of it
// reached the disk, and keeping it is as good as having acknowledged it — or
// it is dropped as a whole. Dropping it is safe because the engine issues
// the origin writes a batch covers only after its Commit returned nil — but
// only if it really was in flight; see "The clean mark" for a committed
// batch that fails its checks.
// For each block of the committed state, the version used is the newest one
// stamped at or below the committed batch; Open verifies that every block
// but the tail is full and the tail holds exactly the committed count.
//
// A batch dropped at recovery leaves valid-looking versions behind (a
// "stray"). The next batch after recovery writes the same blocks into the
// same physical slots (the durable state that chose those slots is
// unchanged) and so overwrites them before the committed range reaches them;
// until then they lie beyond the committed count and are ignored. Two rules
// keep a stray from being taken for committed state:
//
//   - The batch base: a writable Open durably records, before any new batch,
//     a base above every batch number it has seen and above the previous
//     base (the previous session's in-flight batch, even one the scan could
//     not see, was numbered at most one above either), and numbers this
//     session's batches from there. A stray therefore never shares a number
//     with a later batch, nor outranks a batch committed after it.
//     TestStrayBeyondScan builds the case this rule exists for.
//   - Judging newest first, an incomplete batch bounds the committed state
//     to the entries before its F (it continued the committed state), and a
//     batch reaching past that bound is a stray, skipped unexamined. So a
//     stray that later became "complete" — a later session rewrote its
//     slots with the same clusters and bytes — is not taken for the last
//     committed batch: without the rule it would be, and the check that the
//     committed state ends where the in-flight batch began would then fail
//     Open with ErrCorrupt on a store a crash left consistent
//     (TestCompleteStrayBehindIncompleteBatch). If nothing newer exists,
//     accepting it is harmless, as every entry of it was verified against
//     its CRC and a cluster's copy is the same whoever wrote it.
//
// Open fails with ErrCorrupt if the committed state does not end exactly
// where the next (in-flight) batch began.
//
// Only the newest batch's data is checksummed at Open: every older batch was
// fully synced before the newest was written. Check verifies all of it.
//
// # The clean mark
//
// Recovery cannot tell a batch torn in flight from a committed batch damaged
// later (a bad sector, a stray write into the file): both fail their checks
// the same way. Dropping a committed batch would be silent corruption, as
// the engine has already overwritten the origin's clusters it holds: the
// snapshot would serve their new contents as if frozen. So the header says
// whether anything can have been in flight:
//
//   - Close of a persistent store writes the header with the clean mark,
//     the last committed batch B and the entry count T (header bytes
//     96 … 111), and syncs it. Every batch was synced by its Commit before,
//     and none can follow, so (B, T) is exactly the committed state. Close
//     does not write the mark after a failed Commit (what that batch left on
//     disk is unknown; the next Open recovers as after a crash), nor after
//     an Invalidate whose header write failed (the mark would persist
//     "invalid" without its reason).
//   - A writable Open clears the mark in the header write it makes anyway
//     (the batch base), which is synced before any batch of the session is
//     written. So while a batch can be in flight, the disk says "not clean";
//     a crash during that header write leaves the old clean header current,
//     which is still true, since no batch has been written since it.
//   - Open of a store marked clean recovers as above and holds the result
//     against (B, T). Less — batch B dropped, a committed metadata block
//     without a valid version, the scan stopping early — can only be
//     damage: the store opens invalid, with a reason starting "store
//     corrupt:" persisted in the header, so the engine answers EIO for the
//     snapshot rather than origin data. Its Close records the same (B, T)
//     again, not the smaller state recovered, so that every later Open and
//     Check still sees the damage. More (a committed batch above B)
//     means the header slot holding a later session's cleared mark was
//     lost; recovery then stands as after a crash. Check reports the same,
//     without writing. (Damage that makes the metadata contradict itself
//     fails Open with ErrCorrupt, marked or not, as before: the daemon then
//     lists the snapshot as not reopenable, with that error.)
//
// Dropping the in-flight batch after a crash stays correct (the argument
// above), and is made visible: Store.Recovery and Check's Report list every
// dropped batch, and whether it was in flight at the crash (numbered at or
// above the header's batch base: the crashed session's batches) or a
// leftover an earlier recovery dropped already. A batch none of whose
// metadata block versions reached the disk whole leaves at most torn
// versions, which Store.Recovery and Check report as unreadable.
//
// After an unclean shutdown, damage to the newest committed batch looks
// like a torn in-flight batch. The origin tells them apart: its owner
// writes an origin cluster only after the batch holding the cluster's copy
// was committed, so the origin still holds every cluster of a batch that
// really was in flight. Open, given the origin, holds each batch it would
// drop as in flight against it (every entry a valid version of the batch's
// metadata records, with its CRC); a cluster the origin no longer holds
// proves the batch committed, and the store opens invalid ("store corrupt:
// … was committed …") instead of losing it. The limit that remains: a
// committed batch none of whose metadata survived cannot be checked that
// way, and is dropped (listed in Store.Recovery as in flight). Damage to an
// older part of the committed state is found by Open when it breaks the
// structure (a committed block not full, or without a valid version while
// block L+1 holds a batch that began after block L was full: gapIsDamage),
// and by Check's data verification otherwise; what neither finds after an
// unclean shutdown is a scan ending at a damaged block that only batches
// reaching back into it wrote past, which looks like a shorter history
// whose newest batch was torn.
//
// A program that predates the mark refuses a header slot with it
// (nonzero reserved bytes) and falls back to the other slot, the header
// written before Close, which holds the same state and batch base but no
// mark; such a program therefore still opens the store, as after a crash.

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// Version is the newest format version this package reads and writes. It
// writes version 1 for a store that has no base and is no bookmark.
const Version = 2

// MaxBases is how many bases a header holds.
const MaxBases = 31

const (
	headerMagic = "NBSSTORE"
	metaMagic   = "NBSM"

	headerSize  = 4096
	metaStart   = 2 * headerSize // after the two header slots
	blockSize   = 4096
	blockHeader = 48
	// entriesPerBlock is how many 8-byte entries fit between the block
	// header and the 8 trailing bytes (4 zero, 4 CRC).
	entriesPerBlock = (blockSize - blockHeader - 8) / 8 // 505

	crcOff = 4092

	// MinClusterSize and MaxClusterSize bound the cluster size.
	MinClusterSize = 512
	MaxClusterSize = 1 << 20
	// MaxClusters is the most clusters an origin may have (fss's
	// FSS_CLUSTER_MAX); the engine raises the cluster size to stay below.
	MaxClusters = 1 << 24

	maxNameLen     = 255
	maxOriginIDLen = 1024
	maxReasonLen   = 2048

	nameOff     = 128
	originIDOff = 384
	reasonOff   = 1408

	flagPersistent = 1 << 0
	flagFixedSize  = 1 << 1
	flagBookmark   = 1 << 2

	basesOff     = 3456
	baseEntryLen = 20

	cleanBatchOff = 96
	cleanCountOff = 104
	cleanMarkOff  = 108
	cleanEnd      = 112
	cleanMark     = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// State is a store's validity.
type State uint32

// States. A store starts valid; Invalidate makes it invalid for good.
const (
	StateValid   State = 1
	StateInvalid State = 2
)

func (s State) String() string {
	switch s {
	case StateValid:
		return "valid"
	case StateInvalid:
		return "invalid"
	}
	return fmt.Sprintf("State(%d)", uint32(s))
}

// Header is the decoded store header.
type Header struct {
	Version     uint32
	Generation  uint64
	UUID        uuid.UUID
	Name        string
	OriginID    string
	OriginSize  int64
	ClusterSize int
	Created     time.Time
	Persistent  bool
	FixedSize   bool // created on a block device
	MaxSize     int64
	State       State
	Reason      string
	BatchBase   uint64
	DataStart   int64
	// Clean says the store was closed cleanly (see "The clean mark" above)
	// holding CleanCount entries up to batch CleanBatch. A Store's own
	// header is never clean: a writable Open clears the mark on disk
	// before it returns. Only Check's Report shows a clean header.
	Clean      bool
	CleanBatch uint64
	CleanCount uint32
	// Bookmark: the store's data was dropped; it records which clusters
	// were written, not their old contents (version 2).
	Bookmark bool
	// Bases are the stores this one can report changed blocks against
	// (version 2); see "Changed blocks" above.
	Bases []Base
}

// Base is one entry of a header's base table: when this store was created,
// the store UUID held Entries entries.
type Base struct {
	UUID    uuid.UUID
	Entries uint32
}

// version is the format version a header needs: 2 if it uses anything
// version 1 lacks.
func (h *Header) version() uint32 {
	if h.Bookmark || len(h.Bases) > 0 {
		return 2
	}
	return 1
}

// geometry is what the header's fields imply about the layout.
type geometry struct {
	clusterSize int64
	originSize  int64
	maxClusters uint32 // clusters of the origin
	metaBlocks  int64  // logical metadata blocks (0 when transient)
	dataStart   int64
}

func geometryOf(clusterSize int, originSize int64, persistent bool) (geometry, error) {
	cs := int64(clusterSize)
	if cs < MinClusterSize || cs > MaxClusterSize || cs&(cs-1) != 0 {
		return geometry{}, fmt.Errorf("cluster size %d: not a power of two in [%d, %d]", clusterSize, MinClusterSize, MaxClusterSize)
	}
	if originSize <= 0 {
		return geometry{}, fmt.Errorf("origin size %d: must be positive", originSize)
	}
	n := (originSize-1)/cs + 1
	if n > MaxClusters {
		return geometry{}, fmt.Errorf("origin size %d at cluster size %d is %d clusters, more than %d", originSize, cs, n, MaxClusters)
	}
	g := geometry{clusterSize: cs, originSize: originSize, maxClusters: uint32(n)}
	end := int64(metaStart)
	if persistent {
		g.metaBlocks = (n + entriesPerBlock - 1) / entriesPerBlock
		end += 2 * g.metaBlocks * blockSize
	}
	g.dataStart = (end + cs - 1) / cs * cs
	return g, nil
}

// clusterLen is the length of cluster c: the cluster size, except for a
// partial last cluster.
func (g geometry) clusterLen(c uint32) int64 {
	return min(g.clusterSize, g.originSize-int64(c)*g.clusterSize)
}

func (g geometry) slotOff(slot uint32) int64 { return g.dataStart + int64(slot)*g.clusterSize }

// metaOff is the offset of physical slot s of logical block l.
func metaOff(l int64, s int) int64 { return metaStart + (2*l+int64(s))*blockSize }

// encodeHeader writes h into a 4096-byte slot, with (and into h.Version)
// its version, raised to the lowest that holds it: a version 1 store
// becomes version 2 when it turns into a bookmark.
func encodeHeader(h *Header, b []byte) {
	clear(b[:headerSize])
	h.Version = max(h.Version, h.version())
	copy(b[0:8], headerMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], h.Version)
	var flags uint32
	if h.Bookmark {
		flags |= flagBookmark
	}
	if h.Persistent {
		flags |= flagPersistent
	}
	if h.FixedSize {
		flags |= flagFixedSize
	}
	le.PutUint32(b[12:], flags)
	le.PutUint64(b[16:], h.Generation)
	copy(b[24:40], h.UUID[:])
	le.PutUint32(b[40:], uint32(h.ClusterSize))
	le.PutUint32(b[44:], uint32(h.State))
	le.PutUint64(b[48:], uint64(h.OriginSize))
	le.PutUint64(b[56:], uint64(h.Created.UnixNano()))
	le.PutUint64(b[64:], uint64(h.MaxSize))
	le.PutUint64(b[72:], h.BatchBase)
	le.PutUint64(b[80:], uint64(h.DataStart))
	le.PutUint16(b[88:], uint16(len(h.Name)))
	le.PutUint16(b[90:], uint16(len(h.OriginID)))
	le.PutUint16(b[92:], uint16(len(h.Reason)))
	if h.Clean {
		le.PutUint64(b[cleanBatchOff:], h.CleanBatch)
		le.PutUint32(b[cleanCountOff:], h.CleanCount)
		le.PutUint32(b[cleanMarkOff:], cleanMark)
	}
	copy(b[nameOff:], h.Name)
	copy(b[originIDOff:], h.OriginID)
	copy(b[reasonOff:], h.Reason)
	le.PutUint16(b[basesOff:], uint16(len(h.Bases)))
	for i, base := range h.Bases {
		p := b[basesOff+4+baseEntryLen*i:]
		copy(p[:16], base.UUID[:])
		le.PutUint32(p[16:], base.Entries)
	}
	le.PutUint32(b[crcOff:], checksum(b[:crcOff]))
}

// decodeHeader parses one header slot. It checks the magic, then the
// version (so a newer store is refused with ErrVersion whatever the rest
// holds), then the CRC and every field.
func decodeHeader(b []byte) (Header, error) {
	if len(b) < headerSize {
		return Header{}, fmt.Errorf("%w: header slot is %d bytes", ErrNotStore, len(b))
	}
	b = b[:headerSize]
	if string(b[0:8]) != headerMagic {
		return Header{}, fmt.Errorf("%w: bad magic %q", ErrNotStore, b[0:8])
	}
	le := binary.LittleEndian
	h := Header{Version: le.Uint32(b[8:])}
	if h.Version > Version {
		return Header{}, fmt.Errorf("%w: store has format version %d, this program reads up to %d", ErrVersion, h.Version, Version)
	}
	if h.Version == 0 {
		return Header{}, fmt.Errorf("%w: format version 0", ErrNotStore)
	}
	if got, want := checksum(b[:crcOff]), le.Uint32(b[crcOff:]); got != want {
		return Header{}, fmt.Errorf("%w: header checksum %08x, stored %08x", ErrNotStore, got, want)
	}
	flags := le.Uint32(b[12:])
	known := uint32(flagPersistent | flagFixedSize)
	if h.Version >= 2 {
		known |= flagBookmark
	}
	if flags&^known != 0 {
		return Header{}, fmt.Errorf("%w: unknown header flags %#x", ErrCorrupt, flags)
	}
	h.Persistent = flags&flagPersistent != 0
	h.FixedSize = flags&flagFixedSize != 0
	h.Bookmark = flags&flagBookmark != 0
	h.Generation = le.Uint64(b[16:])
	copy(h.UUID[:], b[24:40])
	h.ClusterSize = int(le.Uint32(b[40:]))
	h.State = State(le.Uint32(b[44:]))
	h.OriginSize = int64(le.Uint64(b[48:]))
	h.Created = time.Unix(0, int64(le.Uint64(b[56:]))).UTC()
	h.MaxSize = int64(le.Uint64(b[64:]))
	h.BatchBase = le.Uint64(b[72:])
	h.DataStart = int64(le.Uint64(b[80:]))
	nameLen, idLen, reasonLen := int(le.Uint16(b[88:])), int(le.Uint16(b[90:])), int(le.Uint16(b[92:]))
	mark := le.Uint32(b[cleanMarkOff:])
	h.Clean = mark == cleanMark
	h.CleanBatch = le.Uint64(b[cleanBatchOff:])
	h.CleanCount = le.Uint32(b[cleanCountOff:])
	nbases := int(le.Uint16(b[basesOff:]))
	basesEnd := basesOff + 4 + baseEntryLen*min(nbases, MaxBases)
	switch {
	case h.State != StateValid && h.State != StateInvalid:
		return Header{}, fmt.Errorf("%w: header state %d", ErrCorrupt, h.State)
	case h.MaxSize < 0:
		return Header{}, fmt.Errorf("%w: max size %d", ErrCorrupt, h.MaxSize)
	case h.BatchBase == 0:
		return Header{}, fmt.Errorf("%w: batch base 0", ErrCorrupt)
	case nameLen > maxNameLen || idLen > maxOriginIDLen || reasonLen > maxReasonLen:
		return Header{}, fmt.Errorf("%w: string lengths %d/%d/%d", ErrCorrupt, nameLen, idLen, reasonLen)
	case mark != 0 && mark != cleanMark:
		return Header{}, fmt.Errorf("%w: clean mark %d", ErrCorrupt, mark)
	case !h.Clean && (h.CleanBatch != 0 || h.CleanCount != 0):
		return Header{}, fmt.Errorf("%w: clean batch %d and count %d without the clean mark", ErrCorrupt, h.CleanBatch, h.CleanCount)
	case h.Clean && !h.Persistent:
		return Header{}, fmt.Errorf("%w: clean mark on a transient store", ErrCorrupt)
	case nbases > MaxBases || h.Version < 2 && nbases > 0:
		return Header{}, fmt.Errorf("%w: %d bases in a version %d header", ErrCorrupt, nbases, h.Version)
	case h.Bookmark && !h.Persistent:
		return Header{}, fmt.Errorf("%w: a transient bookmark", ErrCorrupt)
	case h.Clean && (h.CleanBatch == 0) != (h.CleanCount == 0):
		// Every batch adds at least one entry, and batch numbers start at 1.
		return Header{}, fmt.Errorf("%w: clean at batch %d with %d entries", ErrCorrupt, h.CleanBatch, h.CleanCount)
	case !allZero(b[94:cleanBatchOff]) || !allZero(b[cleanEnd:nameOff]) || !allZero(b[nameOff+nameLen:originIDOff]) ||
		!allZero(b[originIDOff+idLen:reasonOff]) || !allZero(b[reasonOff+reasonLen:basesOff]) ||
		!allZero(b[basesOff+2:basesOff+4]) || !allZero(b[basesEnd:crcOff]):
		return Header{}, fmt.Errorf("%w: nonzero reserved header bytes", ErrCorrupt)
	}
	h.Name = string(b[nameOff : nameOff+nameLen])
	h.OriginID = string(b[originIDOff : originIDOff+idLen])
	h.Reason = string(b[reasonOff : reasonOff+reasonLen])
	for i := range nbases {
		p := b[basesOff+4+baseEntryLen*i:]
		var base Base
		copy(base.UUID[:], p[:16])
		base.Entries = le.Uint32(p[16:])
		if base.UUID == (uuid.UUID{}) || base.UUID == h.UUID || base.Entries > MaxClusters {
			return Header{}, fmt.Errorf("%w: base %d (%s, %d entries)", ErrCorrupt, i, base.UUID, base.Entries)
		}
		h.Bases = append(h.Bases, base)
	}
	g, err := geometryOf(h.ClusterSize, h.OriginSize, h.Persistent)
	if err != nil {
		return Header{}, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if g.dataStart != h.DataStart {
		return Header{}, fmt.Errorf("%w: data start %d, geometry says %d", ErrCorrupt, h.DataStart, g.dataStart)
	}
	if h.CleanCount > g.maxClusters {
		return Header{}, fmt.Errorf("%w: clean count %d, origin has %d clusters", ErrCorrupt, h.CleanCount, g.maxClusters)
	}
	return h, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// truncateUTF8 shortens s to at most n bytes without splitting a rune.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// entry is one data slot's record.
type entry struct {
	cluster uint32
	crc     uint32
}

// metaBlock is one decoded version of a logical metadata block.
type metaBlock struct {
	lblock  uint32
	batch   uint64
	uuid    uuid.UUID
	first   uint32 // F: first entry the batch added
	total   uint32 // T: entries after the batch
	entries []entry
}

// blockEntries is how many entries logical block l holds when the store
// has total entries.
func blockEntries(l int64, total uint32) int {
	return int(min(int64(total), (l+1)*entriesPerBlock) - l*entriesPerBlock)
}

// encodeMetaBlock writes m into a 4096-byte block.
func encodeMetaBlock(m *metaBlock, b []byte) {
	clear(b[:blockSize])
	le := binary.LittleEndian
	copy(b[0:4], metaMagic)
	le.PutUint32(b[4:], m.lblock)
	le.PutUint64(b[8:], m.batch)
	copy(b[16:32], m.uuid[:])
	le.PutUint32(b[32:], m.first)
	le.PutUint32(b[36:], m.total)
	le.PutUint32(b[40:], uint32(len(m.entries)))
	for i, e := range m.entries {
		le.PutUint32(b[blockHeader+8*i:], e.cluster)
		le.PutUint32(b[blockHeader+8*i+4:], e.crc)
	}
	le.PutUint32(b[crcOff:], checksum(b[:crcOff]))
}

// decodeMetaBlock checks one block version against everything it can be
// checked against alone: magic, CRC, its place l, the store's UUID and
// cluster count. It decodes the entries only if withEntries (Open's first
// pass needs just the stamps). A block that fails is simply not a valid
// version — torn, never written, or another store's — so the error is for
// Check's report, not a sign of corruption by itself.
func decodeMetaBlock(b []byte, l int64, id uuid.UUID, maxClusters uint32, withEntries bool) (metaBlock, error) {
	if len(b) < blockSize {
		return metaBlock{}, fmt.Errorf("block is %d bytes", len(b))
	}
	b = b[:blockSize]
	le := binary.LittleEndian
	if string(b[0:4]) != metaMagic {
		return metaBlock{}, fmt.Errorf("bad magic %q", b[0:4])
	}
	if got, want := checksum(b[:crcOff]), le.Uint32(b[crcOff:]); got != want {
		return metaBlock{}, fmt.Errorf("checksum %08x, stored %08x", got, want)
	}
	m := metaBlock{
		lblock: le.Uint32(b[4:]),
		batch:  le.Uint64(b[8:]),
		first:  le.Uint32(b[32:]),
		total:  le.Uint32(b[36:]),
	}
	copy(m.uuid[:], b[16:32])
	n := int64(le.Uint32(b[40:]))
	switch {
	case int64(m.lblock) != l:
		return metaBlock{}, fmt.Errorf("block number %d at the place of %d", m.lblock, l)
	case m.uuid != id:
		return metaBlock{}, fmt.Errorf("block of store %s", m.uuid)
	case m.batch == 0:
		return metaBlock{}, fmt.Errorf("batch number 0")
	case m.first >= m.total || m.total > maxClusters:
		return metaBlock{}, fmt.Errorf("entries %d…%d out of range (origin has %d clusters)", m.first, m.total, maxClusters)
	case l*entriesPerBlock >= int64(m.total) || (l+1)*entriesPerBlock <= int64(m.first):
		return metaBlock{}, fmt.Errorf("batch adding entries %d…%d does not touch block %d", m.first, m.total, l)
	case n != int64(blockEntries(l, m.total)):
		return metaBlock{}, fmt.Errorf("%d entries, want %d for a total of %d", n, blockEntries(l, m.total), m.total)
	case !allZero(b[44:48]) || !allZero(b[blockHeader+8*n:crcOff]):
		return metaBlock{}, fmt.Errorf("nonzero reserved bytes")
	}
	if !withEntries {
		return m, nil
	}
	m.entries = make([]entry, n)
	for i := range m.entries {
		e := entry{cluster: le.Uint32(b[blockHeader+8*i:]), crc: le.Uint32(b[blockHeader+8*i+4:])}
		if e.cluster >= maxClusters {
			return metaBlock{}, fmt.Errorf("entry %d: cluster %d out of range (origin has %d)", i, e.cluster, maxClusters)
		}
		m.entries[i] = e
	}
	return m, nil
}
