package backstore

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Options configure a new store.
type Options struct {
	Name        string // snapshot name, ≤ 255 bytes
	ClusterSize int    // power of two, MinClusterSize … MaxClusterSize
	OriginSize  int64  // bytes; the last cluster may be partial
	OriginID    string // identity of the origin, ≤ 1024 bytes; Reopen compares it
	Persistent  bool   // crash-consistent, reopenable; otherwise transient
	MaxSize     int64  // limit on the store's size in bytes; 0: none
	Created     time.Time
	// UUID names the store; zero means a random one. An owner that must
	// recognise its store before Create returns (a record written ahead
	// of the store) chooses it.
	UUID uuid.UUID
	// Bases are the stores of the same origin this one will report
	// changed blocks against, with their entry counts at the create
	// instant (persistent only; see "Changed blocks" in format.go).
	Bases []Base
}

// Cluster is one cluster's copied contents. Data holds the whole cluster:
// ClusterSize bytes, or the origin's remainder for a partial last cluster
// (a full-size buffer is accepted there too; the excess is not stored).
type Cluster struct {
	Index uint32
	Data  []byte
}

// Store is an open backing store.
//
// Concurrency: Commit calls are serialised (the engine has one writer per
// snapshot anyway). ReadCluster, Copied, ForEachCopied, CopiedCount, Bytes
// and Header may run concurrently with Commit and with each other: a
// cluster becomes visible to them only after its Commit has written (and,
// when persistent, synced) its data, and a data slot is never rewritten
// once visible, so a reader never sees a half-written cluster.
//
// Every cluster's CRC32C is kept in memory, in transient stores too, and
// ReadCluster checks it on every read: a store damaged under the running
// snapshot (a bad sector, a truncated file, a stray write) fails the read
// with ErrChecksum instead of returning wrong bytes as the frozen image.
type Store struct {
	f          vfs.File
	geo        geometry
	persistent bool      // immutable copy of the header's flag
	id         uuid.UUID // immutable copy of the header's UUID

	// stageMu orders commits (see Commit) and owns next; it is taken
	// before commitMu.
	stageMu sync.Mutex
	next    uint32 // the first data slot the next Commit writes
	// writeBehind starts writing a persistent store's data back while a
	// Commit writes the rest (nil: transient, or the file cannot).
	writeBehind vfs.WriteBehinder
	// failed is the I/O error that broke the store, if any: set once, read
	// under either lock.
	failed atomic.Pointer[error]

	// commitMu serialises the metadata and sync of commits, Bookmark and
	// Close, and owns the fields below it.
	commitMu  sync.Mutex
	count     uint32  // entries committed: data slots 0 … count−1 are in use
	tail      []entry // entries of the partly filled last block (count%505 of them)
	tailSlot  int     // physical slot of the tail block's durable version
	nextBatch uint64
	lastBatch uint64 // number of the last committed batch; 0: none yet
	limit     int64  // the store may not grow past this offset; 0: no limit
	blockBuf  []byte

	// hdrMu serialises header writes (Invalidate, Open's batch base,
	// Close's clean mark).
	hdrMu sync.Mutex

	recovery Recovery // what Open found; immutable
	// damagedMark is the clean mark Open found unmet (Recovery.Corrupt of
	// a store closed cleanly):
	// Close records it again rather than the smaller state recovered, so
	// that every later Open and Check still sees the damage. Immutable.
	damagedMark *[2]uint64

	// scratch holds cluster-sized buffers for reads of part of a cluster,
	// which must read (and check) the whole cluster, or its blocks.
	scratch sync.Pool
	// blockSums: block checksums of clusters read in part (blocksums.go).
	blockSums blockSums

	// mu guards the index, the checksums, the header and closed.
	mu     sync.RWMutex
	idx    index
	crcs   []uint32 // crcs[slot]: CRC32C of data slot slot's cluster
	hdr    Header
	closed bool
}

// Create makes a new store on f, a regular file (truncated, then grown
// sparsely) or a block device (detected by Truncate failing with EINVAL; the
// store then never grows past the device's size). Both header slots are
// written and synced, in transient mode too, so that Open can always tell
// what the file is. On success the Store owns f; on error the caller still
// does.
func Create(f vfs.File, opts Options) (*Store, error) {
	g, err := geometryOf(opts.ClusterSize, opts.OriginSize, opts.Persistent)
	if err != nil {
		return nil, fmt.Errorf("backstore: create: %w: %v", ErrOptions, err)
	}
	switch {
	case len(opts.Name) > maxNameLen:
		return nil, fmt.Errorf("backstore: create: %w: name is %d bytes, at most %d", ErrOptions, len(opts.Name), maxNameLen)
	case len(opts.OriginID) > maxOriginIDLen:
		return nil, fmt.Errorf("backstore: create: %w: origin identity is %d bytes, at most %d", ErrOptions, len(opts.OriginID), maxOriginIDLen)
	case len(opts.Bases) > 0 && !opts.Persistent || len(opts.Bases) > MaxBases:
		return nil, fmt.Errorf("backstore: create: %w: %d bases (at most %d, persistent stores only)", ErrOptions, len(opts.Bases), MaxBases)
	case opts.MaxSize < 0 || opts.MaxSize > 0 && opts.MaxSize < g.dataStart+g.clusterSize:
		return nil, fmt.Errorf("backstore: create: %w: max size %d leaves no room for data (data starts at %d)", ErrOptions, opts.MaxSize, g.dataStart)
	}
	created := opts.Created
	if created.IsZero() {
		created = time.Now()
	}
	id := opts.UUID
	if id == (uuid.UUID{}) {
		var err error
		if id, err = uuid.NewRandom(); err != nil {
			return nil, fmt.Errorf("backstore: create: uuid: %w", err)
		}
	}
	for _, b := range opts.Bases {
		if b.UUID == (uuid.UUID{}) || b.UUID == id || b.Entries > MaxClusters {
			return nil, fmt.Errorf("backstore: create: %w: base %s with %d entries", ErrOptions, b.UUID, b.Entries)
		}
	}
	h := Header{
		UUID:        id,
		Name:        opts.Name,
		OriginID:    opts.OriginID,
		OriginSize:  opts.OriginSize,
		ClusterSize: opts.ClusterSize,
		Created:     time.Unix(0, created.UnixNano()).UTC(),
		Persistent:  opts.Persistent,
		MaxSize:     opts.MaxSize,
		State:       StateValid,
		BatchBase:   1,
		DataStart:   g.dataStart,
		Bases:       slices.Clone(opts.Bases),
	}
	h.Version = h.version()
	if err := f.Truncate(0); err != nil {
		if !errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("backstore: create: truncate: %w", err)
		}
		h.FixedSize = true
	}
	s := newStore(f, g, h)
	if err := s.setLimit(); err != nil {
		return nil, fmt.Errorf("backstore: create: %w", err)
	}
	// Slot 0 gets generation 0 and slot 1 generation 1, so that neither
	// slot holds leftovers (of an earlier store on the same device).
	buf := make([]byte, headerSize)
	for gen := uint64(0); gen < 2; gen++ {
		h.Generation = gen
		encodeHeader(&h, buf)
		if _, err := f.WriteAt(buf, int64(gen)*headerSize); err != nil {
			return nil, fmt.Errorf("backstore: create: write header slot %d: %w", gen, err)
		}
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("backstore: create: sync: %w", err)
	}
	s.hdr = h
	return s, nil
}

func newStore(f vfs.File, g geometry, h Header) *Store {
	s := &Store{
		f: f, geo: g, persistent: h.Persistent, id: h.UUID, hdr: h,
		nextBatch: h.BatchBase, idx: newIndex(g.maxClusters), blockBuf: make([]byte, blockSize),
	}
	s.scratch.New = func() any { b := make([]byte, g.clusterSize); return &b }
	if wb, ok := f.(vfs.WriteBehinder); ok && h.Persistent {
		s.writeBehind = wb
	}
	return s
}

// setLimit computes how far the store may grow.
func (s *Store) setLimit() error {
	s.limit = s.hdr.MaxSize
	if !s.hdr.FixedSize {
		return nil
	}
	size, err := s.f.Size()
	if err != nil {
		return fmt.Errorf("size of device: %w", err)
	}
	if size < s.geo.dataStart+s.geo.clusterSize {
		return fmt.Errorf("%w: device of %d bytes has no room for data (data starts at %d)", ErrFull, size, s.geo.dataStart)
	}
	if s.limit == 0 || size < s.limit {
		s.limit = size
	}
	return nil
}

// Commit stores a batch of clusters. See the format description (format.go)
// for what is written in which order and why a crash at any point is safe.
//
// Persistent: the data and the metadata blocks, then exactly one Sync; when
// Commit returns nil every cluster of the batch is durable and will be found
// by Open after a crash. Transient: the data only, no Sync.
//
// Errors: ErrBadCluster and ErrFull for MaxSize or the device's end are
// found before anything is written and leave the store as it was. An I/O
// error (ENOSPC wraps ErrFull too) fails the store: later Commits return
// ErrFailed, and a reopen recovers the last committed state. On an invalid
// store Commit returns ErrInvalid.
//
// Two Commits may run at once: the second writes its data while the first
// writes its metadata and syncs, and then waits for it. Commits take their
// data slots under stageMu and take commitMu before they let go of it, so
// they write their metadata in the order of their slots. The second's data
// goes to slots no metadata points at until its own, so a crash still finds
// at most one batch in flight (see "Commit" in format.go). A Commit whose
// data is written when the one before it fails returns ErrFailed. The
// clusters of a Commit still in flight are not known yet to the next one's
// ErrBadCluster check: its caller must not commit a cluster twice. Bookmark
// and Close wait for Commits in progress.
func (s *Store) Commit(batch []Cluster) error {
	s.stageMu.Lock()
	staging := true
	defer func() {
		if staging {
			s.stageMu.Unlock()
		}
	}()
	s.mu.RLock()
	closed, state, bookmark := s.closed, s.hdr.State, s.hdr.Bookmark
	s.mu.RUnlock()
	switch {
	case closed:
		return fmt.Errorf("backstore: commit: %w", ErrClosed)
	case s.failure() != nil:
		return fmt.Errorf("backstore: commit: %w: %v", ErrFailed, s.failure())
	case state != StateValid:
		return fmt.Errorf("backstore: commit: %w", ErrInvalid)
	case len(batch) == 0:
		return nil
	}
	if err := s.checkBatch(batch); err != nil {
		return fmt.Errorf("backstore: commit: %w", err)
	}
	first := s.next
	total := first + uint32(len(batch))
	if end := s.geo.slotOff(total); s.limit > 0 && end > s.limit && !bookmark {
		return fmt.Errorf("backstore: commit of %d clusters needs %d bytes, limit %d: %w", len(batch), end, s.limit, ErrFull)
	}

	entries := make([]entry, len(batch))
	behind := s.geo.slotOff(first) // data before it was handed to writeBehind
	for i, c := range batch {
		if bookmark {
			// No data: the entry records that the cluster was written.
			entries[i] = entry{cluster: c.Index}
			continue
		}
		data := c.Data[:s.geo.clusterLen(c.Index)]
		entries[i] = entry{cluster: c.Index, crc: checksum(data)}
		slot := first + uint32(i)
		off := s.geo.slotOff(slot)
		if _, err := s.f.WriteAt(data, off); err != nil {
			return s.fail(fmt.Errorf("backstore: write data slot %d (cluster %d): %w", slot, c.Index, ioErr(err)))
		}
		if end := off + int64(len(data)); end-behind >= writeBehindBytes || i == len(batch)-1 {
			s.startWriteback(behind, end)
			behind = end
		}
	}
	s.next = total
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.stageMu.Unlock()
	staging = false
	if err := s.failure(); err != nil {
		// The Commit before this one failed after this one took its
		// slots: the store is broken, and these entries cannot follow.
		return fmt.Errorf("backstore: commit: %w: %v", ErrFailed, err)
	}
	// Every Commit that took slots before this one has returned, so first
	// is count.
	var newTail []entry
	var newTailSlot int
	if s.persistent {
		var err error
		if newTail, newTailSlot, err = s.writeMeta(first, total, entries); err != nil {
			return s.fail(err)
		}
		if err := s.f.Sync(); err != nil {
			return s.fail(fmt.Errorf("backstore: sync batch %d: %w", s.nextBatch, ioErr(err)))
		}
		s.lastBatch = s.nextBatch
		s.nextBatch++
		s.tail, s.tailSlot = newTail, newTailSlot
	}

	// Publish: only now may readers find the new clusters.
	s.mu.Lock()
	for i, e := range entries {
		s.idx.insert(e.cluster, first+uint32(i))
		s.crcs = append(s.crcs, e.crc)
	}
	s.mu.Unlock()
	s.count = total
	return nil
}

// writeBehindBytes is how much data a Commit writes before it asks the file
// to start writing it back: enough for the device to get large writes,
// little enough that it starts early in a commit of a few MiB.
const writeBehindBytes = 1 << 20

// startWriteback asks the file to start writing [off, end) back, so that
// the device works while the Commit writes on (and, with two Commits in
// flight, while the second waits for the first's sync), and the sync finds
// the data mostly written: a fresh store file grows with each commit, and
// without this its data reaches the device only once fdatasync asks.
// It is called with stageMu held. A hint: the Sync that makes the batch
// durable reports any error of the device, so a failure here only turns
// write-behind off.
func (s *Store) startWriteback(off, end int64) {
	if s.writeBehind == nil {
		return
	}
	if err := s.writeBehind.StartWriteback(off, end-off); err != nil {
		s.writeBehind = nil
	}
}

// checkBatch refuses a batch that names a cluster out of range, already
// copied or twice, or carries too little data.
func (s *Store) checkBatch(batch []Cluster) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var seen map[uint32]struct{}
	if len(batch) > 1 {
		seen = make(map[uint32]struct{}, len(batch))
	}
	for _, c := range batch {
		switch {
		case c.Index >= s.geo.maxClusters:
			return fmt.Errorf("%w: cluster %d out of range (origin has %d)", ErrBadCluster, c.Index, s.geo.maxClusters)
		case (!s.hdr.Bookmark || c.Data != nil) && // a bookmark needs no data
			(int64(len(c.Data)) < s.geo.clusterLen(c.Index) || int64(len(c.Data)) > s.geo.clusterSize):
			return fmt.Errorf("%w: cluster %d has %d bytes of data, want %d", ErrBadCluster, c.Index, len(c.Data), s.geo.clusterLen(c.Index))
		case s.idx.has(c.Index):
			return fmt.Errorf("%w: cluster %d already copied", ErrBadCluster, c.Index)
		}
		if seen != nil {
			if _, dup := seen[c.Index]; dup {
				return fmt.Errorf("%w: cluster %d twice in one batch", ErrBadCluster, c.Index)
			}
			seen[c.Index] = struct{}{}
		}
	}
	return nil
}

// writeMeta writes every metadata block that holds entries first … total−1
// (step 2 of a Commit) and returns the new tail: the entries and physical
// slot of the last block if it is partly filled.
func (s *Store) writeMeta(first, total uint32, added []entry) ([]entry, int, error) {
	m := metaBlock{batch: s.nextBatch, uuid: s.id, first: first, total: total}
	// all is the tail block's old entries followed by the new ones; block l
	// holds all[(l−l0)*505 …].
	l0 := int64(first) / entriesPerBlock
	all := append(slices.Clip(s.tail), added...)
	lastL := int64(total-1) / entriesPerBlock
	var tailSlot int
	for l := l0; l <= lastL; l++ {
		lo := (l - l0) * entriesPerBlock
		m.lblock = uint32(l)
		m.entries = all[lo:min(lo+entriesPerBlock, int64(len(all)))]
		// The invariant of the whole design: never overwrite the durable
		// version of a block. Only the tail block l0 has one (blocks after
		// it are new), and it sits in physical slot s.tailSlot.
		phys := 0
		if l == l0 && len(s.tail) > 0 {
			phys = 1 - s.tailSlot
		}
		encodeMetaBlock(&m, s.blockBuf)
		if _, err := s.f.WriteAt(s.blockBuf, metaOff(l, phys)); err != nil {
			return nil, 0, fmt.Errorf("backstore: write metadata block %d slot %d: %w", l, phys, ioErr(err))
		}
		tailSlot = phys
	}
	n := int(total % entriesPerBlock)
	if n == 0 {
		return nil, 0, nil // the last block is full; the next batch starts a new one
	}
	return slices.Clone(all[len(all)-n:]), tailSlot, nil
}

// fail records an I/O error that leaves the store in an unknown state.
func (s *Store) fail(err error) error {
	s.failed.CompareAndSwap(nil, &err)
	return err
}

// failure is the error that broke the store, or nil.
func (s *Store) failure() error {
	if p := s.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// ioErr adds ErrFull to an error caused by ENOSPC.
func ioErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrFull) {
		return fmt.Errorf("%w: %w", ErrFull, err)
	}
	return err
}

// ReadCluster reads len(p) bytes at offset off of the stored copy of
// cluster index. ok reports whether the store holds the cluster; when it
// does not, p is untouched. Safe concurrently with Commit.
//
// The whole cluster is read and checked against its CRC32C, also when p
// asks for part of it (then its 4 KiB blocks' checksums are kept, and a
// later partial read reads and checks just the blocks it needs: see
// blocksums.go): a mismatch returns an error wrapping ErrChecksum (p's
// contents are then unspecified). A slot past the end of the file
// reads as zeros and is checked like any other: recovery checks data the
// same way, so it keeps a batch of zero clusters whose writes were lost in
// a crash (the file never grew), and zeros are their contents; a store
// truncated under a snapshot fails the check for every other cluster.
func (s *Store) ReadCluster(index uint32, p []byte, off int) (ok bool, err error) {
	s.mu.RLock()
	closed, bookmark := s.closed, s.hdr.Bookmark
	var slot, want uint32
	if index < s.geo.maxClusters {
		if slot, ok = s.idx.lookup(index); ok {
			want = s.crcs[slot]
		}
	}
	s.mu.RUnlock()
	if closed {
		return false, fmt.Errorf("backstore: read cluster %d: %w", index, ErrClosed)
	}
	if !ok {
		return false, nil
	}
	if bookmark {
		return true, fmt.Errorf("backstore: read cluster %d: %w", index, ErrBookmark)
	}
	n := s.geo.clusterLen(index)
	if off < 0 || int64(off)+int64(len(p)) > n {
		return true, fmt.Errorf("backstore: read cluster %d bytes %d…%d: outside its %d bytes", index, off, off+len(p), n)
	}
	if int64(len(p)) == n {
		if err := readFull(s.f, p, s.geo.slotOff(slot)); err != nil {
			return true, fmt.Errorf("backstore: read cluster %d from slot %d: %w", index, slot, err)
		}
		return true, s.verify(index, slot, p, want)
	}
	// A part of the cluster: by its blocks if their sums are known, else
	// whole (see blocksums.go).
	b := s.scratch.Get().(*[]byte)
	defer s.scratch.Put(b)
	buf := (*b)[:n]
	byBlocks := n > sumBlock
	if byBlocks {
		if sums := s.blockSums.get(index); sums != nil {
			return true, s.readBlocks(index, slot, p, off, sums, buf)
		}
	}
	if err := readFull(s.f, buf, s.geo.slotOff(slot)); err != nil {
		return true, fmt.Errorf("backstore: read cluster %d from slot %d: %w", index, slot, err)
	}
	if err := s.verify(index, slot, buf, want); err != nil {
		return true, err
	}
	if byBlocks {
		s.blockSums.add(index, buf)
	}
	copy(p, buf[off:])
	return true, nil
}

// verify checks a whole cluster read from slot against its checksum.
func (s *Store) verify(index, slot uint32, data []byte, want uint32) error {
	if got := checksum(data); got != want {
		return fmt.Errorf("backstore: %w: cluster %d (data slot %d at offset %d) has checksum %08x, recorded %08x",
			ErrChecksum, index, slot, s.geo.slotOff(slot), got, want)
	}
	return nil
}

// readBlocks reads bytes [off, off+len(p)) of a cluster by the sumBlock
// blocks that hold them, each checked against its block sum; buf is
// scratch space the size of the cluster.
func (s *Store) readBlocks(index, slot uint32, p []byte, off int, sums []uint32, buf []byte) error {
	lo := off / sumBlock * sumBlock
	hi := min((off+len(p)+sumBlock-1)/sumBlock*sumBlock, len(buf)) // the last block may be short
	if err := readFull(s.f, buf[lo:hi], s.geo.slotOff(slot)+int64(lo)); err != nil {
		return fmt.Errorf("backstore: read cluster %d from slot %d: %w", index, slot, err)
	}
	for b := lo; b < hi; b += sumBlock {
		block := buf[b:min(b+sumBlock, hi)]
		if got, want := checksum(block), sums[b/sumBlock]; got != want {
			return fmt.Errorf("backstore: %w: cluster %d (data slot %d at offset %d), bytes %d…%d, have checksum %08x, %08x when the cluster was last checked whole",
				ErrChecksum, index, slot, s.geo.slotOff(slot), b, b+len(block)-1, got, want)
		}
	}
	copy(p, buf[off:])
	return nil
}

// Copied reports whether the store holds cluster index.
func (s *Store) Copied(index uint32) bool {
	if index >= s.geo.maxClusters {
		return false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.idx.has(index)
}

// ForEachCopied calls fn for every cluster the store holds, in increasing
// order. It looks at one chunk of the map at a time without holding a lock
// while fn runs, so fn may call the Store; clusters committed meanwhile may
// or may not be visited.
func (s *Store) ForEachCopied(fn func(index uint32)) {
	for i := range s.idx.chunks {
		s.mu.RLock()
		ch := indexChunk{bits: s.idx.chunks[i].bits}
		s.mu.RUnlock()
		ch.forEach(uint32(i)<<chunkShift, fn)
	}
}

// Entry returns the entry number of cluster index: its data slot, which
// follows commit order (see "Changed blocks" in format.go); ok is false
// if the store does not hold the cluster.
func (s *Store) Entry(index uint32) (entry uint32, ok bool) {
	if index >= s.geo.maxClusters {
		return 0, false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.idx.lookup(index)
}

// CopiedCount returns how many clusters the store holds.
func (s *Store) CopiedCount() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.idx.n
}

// Bytes returns the bytes the store occupies: both header slots, every
// metadata block version in use, and the copied data.
func (s *Store) Bytes() int64 {
	s.mu.RLock()
	n, bookmark := int64(s.idx.n), s.hdr.Bookmark
	s.mu.RUnlock()
	b := int64(2 * headerSize)
	if !bookmark {
		b += n * s.geo.clusterSize
	}
	if s.persistent {
		b += 2 * blockSize * ((n + entriesPerBlock - 1) / entriesPerBlock)
	}
	return b
}

// Recovery returns what Open found when it rebuilt the map: the batches it
// dropped and, for a store it opened invalid, why. It is zero for a store
// made by Create.
func (s *Store) Recovery() Recovery {
	rec := s.recovery
	rec.Dropped = slices.Clone(rec.Dropped)
	rec.Unreadable = slices.Clone(rec.Unreadable)
	return rec
}

// Header returns the current header.
func (s *Store) Header() Header {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.hdr
}

// Invalidate marks the store invalid for good, with a reason (cut to 2048
// bytes), and persists that in the header. Later Commits return ErrInvalid.
// The first reason is kept: invalidating an invalid store changes nothing.
// The in-memory state turns invalid even if writing the header fails.
func (s *Store) Invalidate(reason string) error {
	s.hdrMu.Lock()
	defer s.hdrMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("backstore: invalidate: %w", ErrClosed)
	}
	h := s.hdr
	if h.State == StateInvalid && h.Reason != "" {
		s.mu.Unlock()
		return nil
	}
	h.State, h.Reason = StateInvalid, truncateUTF8(reason, maxReasonLen)
	// Invalid from now on in memory; Reason stays empty until persisted,
	// so that a failed write is retried by the next Invalidate.
	s.hdr.State = StateInvalid
	s.mu.Unlock()
	if err := s.writeHeader(&h); err != nil {
		return fmt.Errorf("backstore: invalidate: %w", err)
	}
	return nil
}

// Bookmark turns a valid persistent store into a bookmark: its data is
// dropped, and from now on Commit records clusters without their data (see
// "Changed blocks" in format.go). The header write, synced, is the point
// of no return: ReadCluster fails with ErrBookmark from then on. The data
// region is then deallocated where the file can (a regular file on a file
// system that punches holes; a block device keeps its bytes).
func (s *Store) Bookmark() error {
	s.stageMu.Lock()
	defer s.stageMu.Unlock()
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.hdrMu.Lock()
	defer s.hdrMu.Unlock()
	s.mu.RLock()
	h, closed := s.hdr, s.closed
	s.mu.RUnlock()
	switch {
	case closed:
		return fmt.Errorf("backstore: bookmark: %w", ErrClosed)
	case !s.persistent:
		return fmt.Errorf("backstore: bookmark: %w: a transient store keeps no map", ErrOptions)
	case s.failure() != nil:
		return fmt.Errorf("backstore: bookmark: %w: %v", ErrFailed, s.failure())
	case h.State != StateValid:
		return fmt.Errorf("backstore: bookmark: %w", ErrInvalid)
	case h.Bookmark:
		return nil
	}
	h.Bookmark = true
	if err := s.writeHeader(&h); err != nil {
		return fmt.Errorf("backstore: bookmark: %w", err)
	}
	s.dropData()
	return nil
}

// dropData deallocates the data slots of a bookmark, best effort: the
// bytes are never read again, so failing to free them costs space only.
func (s *Store) dropData() {
	if d, ok := s.f.(vfs.Deallocator); ok && !s.hdr.FixedSize && s.count > 0 {
		_ = d.Deallocate(s.geo.dataStart, s.geo.slotOff(s.count)-s.geo.dataStart)
	}
}

// writeHeader writes h with the next generation into the slot that does
// not hold the current header, syncs, and makes it current. The current
// header stays intact in the other slot, so a torn write loses nothing.
// The caller holds hdrMu.
func (s *Store) writeHeader(h *Header) error {
	h.Generation = s.Header().Generation + 1
	if err := writeHeaderSlot(s.f, h); err != nil {
		return err
	}
	s.mu.Lock()
	s.hdr = *h
	s.mu.Unlock()
	return nil
}

// Close waits for a Commit in progress, records the clean mark in the
// header of a persistent store (durably: the committed batch and entry
// count, see "The clean mark" in format.go), and closes the file.
// Everything committed is already durable (persistent) or abandoned
// (transient). The mark is not recorded when a Commit failed with an I/O
// error (what that batch left on disk is unknown, so the next Open must
// recover as after a crash) nor when an Invalidate could not persist its
// header. The file is closed even if writing the mark fails; the store is
// then reopened as after a crash, which is safe.
func (s *Store) Close() error {
	s.stageMu.Lock()
	defer s.stageMu.Unlock()
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.hdrMu.Lock()
	defer s.hdrMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("backstore: close: %w", ErrClosed)
	}
	s.closed = true
	h := s.hdr
	s.mu.Unlock()
	var markErr error
	// An invalid header without its reason is an Invalidate whose header
	// write failed: writing h would persist "invalid" with no reason.
	unpersisted := h.State == StateInvalid && h.Reason == ""
	if s.persistent && s.failure() == nil && !unpersisted {
		h.Clean, h.CleanBatch, h.CleanCount = true, s.lastBatch, s.count
		if m := s.damagedMark; m != nil {
			h.CleanBatch, h.CleanCount = m[0], uint32(m[1])
		}
		if err := s.writeHeader(&h); err != nil {
			markErr = fmt.Errorf("backstore: close: record clean mark: %w", err)
		}
	}
	if err := s.f.Close(); err != nil {
		return errors.Join(markErr, fmt.Errorf("backstore: close: %w", err))
	}
	return markErr
}
