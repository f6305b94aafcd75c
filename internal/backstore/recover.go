package backstore

import (
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Open reopens a persistent store after a restart or a crash and rebuilds
// its map (see "Commit (persistent) and why a crash anywhere is safe" in
// format.go). A batch that was in flight at a crash is kept if all of it
// reached the disk and dropped otherwise; [Store.Recovery] says what was
// dropped. Before returning, Open durably records in the header a new
// batch base, so this session's batches outrank anything an earlier
// session left behind, and clears the clean mark.
//
// If the store was closed cleanly but the committed state its clean mark
// records is not on the disk whole (damage, not a crash: see "The clean
// mark" in format.go), Open does not drop the damaged batch silently: the
// store opens invalid, with a reason starting "store corrupt:" persisted
// in the header (an invalid store keeps the reason it already had), and
// [Recovery].Corrupt set.
//
// If origin is not nil, it is the origin the store was taken of, as it is
// now, and Open holds every batch it drops as in flight against it: a batch
// whose clusters the origin no longer holds was committed, so what failed
// its checks is damage, and the store opens invalid with a reason starting
// "store corrupt:", as above. This closes, for every batch whose metadata
// survived, the gap the clean mark leaves after an unclean shutdown (see
// "The clean mark" in format.go). It is done before Open writes anything,
// so a failed origin read fails Open and the next Open checks again.
//
// It refuses a transient store with ErrTransient, a newer format with
// ErrVersion, a file that is no store with ErrNotStore, and metadata no
// crash can produce with ErrCorrupt. On success the Store owns f.
func Open(f vfs.File, origin io.ReaderAt) (*Store, error) {
	h, _, err := readHeader(f)
	if err != nil {
		return nil, fmt.Errorf("backstore: open: %w", err)
	}
	if !h.Persistent {
		return nil, fmt.Errorf("backstore: open %q: %w", h.Name, ErrTransient)
	}
	r, err := recoverMap(f, h)
	if err != nil {
		return nil, fmt.Errorf("backstore: open %q: %w", h.Name, err)
	}
	rec := r.recovery(h)
	// A bookmark keeps no data to hold against the origin.
	if origin != nil && rec.Corrupt == "" && !h.Bookmark {
		if rec.Corrupt, err = verifyDropped(origin, r.geo, rec); err != nil {
			return nil, fmt.Errorf("backstore: open %q: %w", h.Name, err)
		}
	}
	s := newStore(f, r.geo, h)
	s.idx, s.crcs = r.idx, r.crcs
	s.count, s.next = r.total, r.total
	s.lastBatch = r.committed
	s.tail, s.tailSlot = r.tail, r.tailSlot
	s.recovery = rec
	if err := s.setLimit(); err != nil {
		return nil, fmt.Errorf("backstore: open %q: %w", h.Name, err)
	}
	h.BatchBase = max(h.BatchBase, r.maxBatch) + 2
	if rec.Corrupt != "" {
		if h.Clean {
			s.damagedMark = &[2]uint64{h.CleanBatch, uint64(h.CleanCount)}
		}
		if h.State == StateValid {
			h.State, h.Reason = StateInvalid, truncateUTF8(rec.Corrupt, maxReasonLen)
		}
	}
	// Dirty from here on: this write is synced before any batch of this
	// session is written, so a crash in the session is never taken for a
	// clean close.
	h.Clean, h.CleanBatch, h.CleanCount = false, 0, 0
	s.hdrMu.Lock()
	err = s.writeHeader(&h)
	s.hdrMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("backstore: open %q: record batch base: %w", h.Name, err)
	}
	s.nextBatch = h.BatchBase
	if h.Bookmark {
		s.dropData() // again, in case a crash came before the first time
	}
	return s, nil
}

// Recovery is what Open found when it rebuilt a store's map, for the
// engine and the daemon to log.
type Recovery struct {
	// Clean: the header held the clean mark, so nothing was in flight and
	// the committed state was known before recovery looked for it.
	Clean bool
	// CommittedBatch and Clusters describe the committed state recovered.
	CommittedBatch uint64
	Clusters       int
	// Dropped lists, newest first, the batches found on disk that are not
	// part of the committed state.
	Dropped []DroppedBatch
	// Corrupt, when not empty, is why Open made the store invalid: the
	// store was closed cleanly but the committed state its clean mark
	// records is not on the disk whole, or a batch dropped as in flight
	// proved committed against the origin (Open's origin argument).
	Corrupt string
	// Unreadable lists the metadata block versions, up to where the scan
	// stopped, that are neither valid nor blank: torn by a crash (a batch
	// whose metadata never reached the disk leaves no other trace),
	// damaged, or left from an earlier use of the device. Their blocks' other
	// versions were used.
	Unreadable []string
	// StaleClean: the clean mark was older than the committed state found,
	// which only the loss of a newer header slot explains; recovery then
	// went on as after a crash.
	StaleClean bool
}

// DroppedBatch is a batch recovery did not take.
type DroppedBatch struct {
	Batch uint64
	// First and Total: the batch added entries First … Total−1.
	First, Total uint32
	// Leftover: the batch is numbered below the batch base of the session
	// that wrote the store last, so an earlier recovery already dropped it
	// and nothing is lost now. Otherwise it was that session's batch in
	// flight at a crash (or, in a cleanly closed store, a damaged one).
	Leftover bool
	// Why says what is missing or damaged.
	Why string
	// Entries are the clusters the batch added, with their checksums, as
	// far as a valid version of its metadata records them (all of them
	// when only its data is torn or damaged; none for a stray, which is
	// not examined). An owner can hold them against the origin: the
	// origin still holds every cluster of a batch that really was in
	// flight (see Open).
	Entries []DroppedEntry
}

// DroppedEntry is one cluster a dropped batch added: its index and the
// CRC32C of the data it copied.
type DroppedEntry struct {
	Cluster uint32
	CRC     uint32
}

func (d DroppedBatch) String() string {
	kind := "in flight at a crash"
	if d.Leftover {
		kind = "left behind by an earlier recovery"
	}
	return fmt.Sprintf("batch %d (entries %d…%d, %s) dropped: %s", d.Batch, d.First, d.Total-1, kind, d.Why)
}

// verifyDropped holds the batches recovery dropped as in flight at a crash
// against the origin. The store's owner writes an origin cluster only
// after the batch holding that cluster's copy was committed (Commit
// returned), so every cluster of a batch really in flight still holds, on
// the origin, exactly the data the batch copied. A cluster whose origin data
// no longer matches the checksum the batch recorded proves the batch was
// committed: what failed its checks is damage (a bad sector, a stray write),
// not a torn write, and dropping it would serve the origin's new data as the
// snapshot's. verifyDropped then returns why ("store corrupt: …").
func verifyDropped(origin io.ReaderAt, g geometry, rec Recovery) (string, error) {
	buf := make([]byte, g.clusterSize)
	for _, d := range rec.Dropped {
		if d.Leftover {
			// Dropped by an earlier recovery: the origin has been
			// written since, legitimately.
			continue
		}
		for _, e := range d.Entries {
			p := buf[:g.clusterLen(e.Cluster)]
			if n, err := origin.ReadAt(p, int64(e.Cluster)*g.clusterSize); n < len(p) {
				return "", fmt.Errorf("verify dropped batch %d: read origin cluster %d: %w", d.Batch, e.Cluster, err)
			}
			if checksum(p) != e.CRC {
				return fmt.Sprintf("store corrupt: batch %d (entries %d…%d) was committed (origin cluster %d no longer holds the data it copied, so the origin was written after it), but it is damaged: %s",
					d.Batch, d.First, d.Total-1, e.Cluster, d.Why), nil
			}
		}
	}
	return "", nil
}

// DroppedClusters is how many clusters this recovery dropped: those of
// the dropped batches that are not leftovers.
func (r Recovery) DroppedClusters() int {
	n := 0
	for _, d := range r.Dropped {
		if !d.Leftover {
			n += int(d.Total - d.First)
		}
	}
	return n
}

func droppedBatch(h Header, bi batchInfo, why string) DroppedBatch {
	return DroppedBatch{Batch: bi.batch, First: bi.first, Total: bi.total, Leftover: bi.batch < h.BatchBase, Why: why}
}

// recovery summarises r and holds it against the clean mark of h.
func (r *recovered) recovery(h Header) Recovery {
	rec := Recovery{Clean: h.Clean, CommittedBatch: r.committed, Clusters: int(r.total), Dropped: r.dropped, Unreadable: r.unreadable}
	switch {
	case !h.Clean || r.committed == h.CleanBatch && r.total == h.CleanCount:
	case r.committed > h.CleanBatch && r.total >= h.CleanCount:
		// Batches after the clean close were committed (their session's
		// Open cleared the mark in the other header slot, which must since
		// have been damaged). The state found continues the marked one.
		rec.Clean, rec.StaleClean = false, true
	default:
		rec.Corrupt = r.cleanMismatch(h)
	}
	return rec
}

// cleanMismatch says how the committed state found falls short of the one
// h's clean mark records.
func (r *recovered) cleanMismatch(h Header) string {
	found := "no batch is intact"
	if r.committed > 0 {
		found = fmt.Sprintf("only entries 0…%d, up to batch %d, are intact", r.total-1, r.committed)
	}
	for _, d := range r.dropped {
		if d.Batch == h.CleanBatch {
			return fmt.Sprintf("store corrupt: batch %d (entries %d…%d), committed before the last clean shutdown, is damaged: %s; %s",
				d.Batch, d.First, d.Total-1, d.Why, found)
		}
	}
	return fmt.Sprintf("store corrupt: the last clean shutdown recorded %d entries up to batch %d, but %s (metadata of batch %d missing or damaged)",
		h.CleanCount, h.CleanBatch, found, h.CleanBatch)
}

// readHeader reads both header slots and returns the valid one with the
// higher generation, and each slot's problem (nil when valid). A slot of a
// newer format version fails the whole read with ErrVersion.
func readHeader(f vfs.File) (Header, [2]error, error) {
	var slotErr [2]error
	buf := make([]byte, 2*headerSize)
	if err := readFull(f, buf, 0); err != nil {
		return Header{}, slotErr, fmt.Errorf("read header: %w", err)
	}
	var hs [2]Header
	for i := range hs {
		hs[i], slotErr[i] = decodeHeader(buf[i*headerSize : (i+1)*headerSize])
		if errors.Is(slotErr[i], ErrVersion) {
			return Header{}, slotErr, fmt.Errorf("header slot %d: %w", i, slotErr[i])
		}
	}
	switch {
	case slotErr[0] != nil && slotErr[1] != nil:
		// Wrap the more specific problem of the two, and name each once.
		switch {
		case slotErr[0].Error() == slotErr[1].Error():
			return Header{}, slotErr, fmt.Errorf("no valid header slot (both: %w)", slotErr[0])
		case errors.Is(slotErr[1], ErrCorrupt):
			return Header{}, slotErr, fmt.Errorf("no valid header slot (slot 0: %v; slot 1: %w)", slotErr[0], slotErr[1])
		}
		return Header{}, slotErr, fmt.Errorf("no valid header slot (slot 0: %w; slot 1: %v)", slotErr[0], slotErr[1])
	case slotErr[0] != nil:
		return hs[1], slotErr, nil
	case slotErr[1] != nil:
		return hs[0], slotErr, nil
	case hs[0].UUID != hs[1].UUID:
		return Header{}, slotErr, fmt.Errorf("%w: header slots belong to different stores (%s, %s)", ErrCorrupt, hs[0].UUID, hs[1].UUID)
	case hs[1].Generation > hs[0].Generation:
		return hs[1], slotErr, nil
	}
	return hs[0], slotErr, nil
}

// readFull reads len(p) bytes at off; bytes past the end of the file read
// as zeros (a sparse store's unwritten tail).
func readFull(f vfs.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// stamp is what Open's first pass keeps of one valid block version.
type stamp struct {
	valid        bool
	batch        uint64
	first, total uint32
}

// batchInfo is what the first pass learns of one batch number.
type batchInfo struct {
	batch        uint64
	first, total uint32
}

// recovered is the outcome of recoverMap.
type recovered struct {
	geo       geometry
	scanned   int64  // logical blocks up to the first without a valid version
	maxBatch  uint64 // highest batch number seen
	committed uint64 // the last committed batch; 0 for an empty store
	dropped   []DroppedBatch
	// unreadable lists the block versions up to the end of the scan that
	// are neither valid nor blank.
	unreadable []string
	total      uint32 // committed entries
	idx        index
	crcs       []uint32 // crcs[slot]: the checksum of each committed data slot
	tail       []entry
	tailSlot   int
	// Only when recoverMap is asked to keep them (for Check): the cluster
	// of each slot and the physical slot chosen for each committed block.
	slots  []uint32
	chosen []int8
}

// scanChunk is how many logical blocks the first pass reads at once.
const scanChunk = 128

// recoverMap finds the committed state of a persistent store: pass 1 reads
// the stamps of every block version, the batches are judged, pass 2 reads
// the chosen version of each committed block into the index. keepSlots
// also returns the slot → cluster list (for Check).
func recoverMap(f vfs.File, h Header, keepSlots ...bool) (*recovered, error) {
	g, err := geometryOf(h.ClusterSize, h.OriginSize, h.Persistent)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	r := &recovered{geo: g}

	// Pass 1. Committed blocks are contiguous from block 0 and each keeps
	// a valid version, so the first block without one ends the scan.
	var stamps [][2]stamp
	buf := make([]byte, 2*blockSize*min(scanChunk, g.metaBlocks))
scan:
	for l0 := int64(0); l0 < g.metaBlocks; l0 += scanChunk {
		n := min(scanChunk, g.metaBlocks-l0)
		chunk := buf[:2*blockSize*n]
		if err := readFull(f, chunk, metaOff(l0, 0)); err != nil {
			return nil, fmt.Errorf("read metadata blocks %d…%d: %w", l0, l0+n-1, err)
		}
		for i := int64(0); i < n; i++ {
			var pair [2]stamp
			for s := 0; s < 2; s++ {
				b := chunk[(2*i+int64(s))*blockSize:]
				m, err := decodeMetaBlock(b, l0+i, h.UUID, g.maxClusters, false)
				switch {
				case err == nil:
					pair[s] = stamp{valid: true, batch: m.batch, first: m.first, total: m.total}
				case !allZero(b[:blockSize]):
					r.unreadable = append(r.unreadable, fmt.Sprintf("metadata block %d slot %d: %v", l0+i, s, err))
				}
			}
			if !pair[0].valid && !pair[1].valid {
				break scan
			}
			stamps = append(stamps, pair)
		}
	}
	r.scanned = int64(len(stamps))
	if err := gapIsDamage(f, g, h, r.scanned); err != nil {
		return nil, err
	}

	// The batches seen, newest first. Every version a batch wrote carries
	// the same F and T.
	byBatch := make(map[uint64]batchInfo)
	for l, pair := range stamps {
		for _, st := range pair {
			if !st.valid {
				continue
			}
			bi, seen := byBatch[st.batch]
			if seen && (bi.first != st.first || bi.total != st.total) {
				return nil, fmt.Errorf("%w: batch %d stamped %d…%d in block %d but %d…%d elsewhere",
					ErrCorrupt, st.batch, st.first, st.total, l, bi.first, bi.total)
			}
			byBatch[st.batch] = batchInfo{batch: st.batch, first: st.first, total: st.total}
			r.maxBatch = max(r.maxBatch, st.batch)
		}
	}
	batches := make([]batchInfo, 0, len(byBatch))
	for _, bi := range byBatch {
		batches = append(batches, bi)
	}
	slices.SortFunc(batches, func(a, b batchInfo) int { return -cmpU64(a.batch, b.batch) })

	// Judge the batches, newest first. The first complete one is the last
	// committed batch. An incomplete one was in flight at a crash: the
	// committed state ends where it started (bound). A batch reaching past
	// bound is a stray an earlier recovery dropped, skipped unexamined.
	bound := uint32(0)
	bounded := false
	for _, bi := range batches {
		if bounded && bi.total > bound {
			r.dropped = append(r.dropped, droppedBatch(h, bi, "reaches past a newer incomplete batch: left behind by an earlier recovery"))
			continue
		}
		why, known, err := batchComplete(f, g, h, stamps, bi)
		if err != nil {
			return nil, err
		}
		if why == "" {
			r.committed, r.total = bi.batch, bi.total
			break
		}
		d := droppedBatch(h, bi, why)
		for _, e := range known {
			d.Entries = append(d.Entries, DroppedEntry{Cluster: e.cluster, CRC: e.crc})
		}
		r.dropped = append(r.dropped, d)
		if !bounded || bi.first < bound {
			bound, bounded = bi.first, true
		}
	}
	if bounded && bound != r.total {
		return nil, fmt.Errorf("%w: last committed batch %d ends at entry %d, but the batch after it starts at %d",
			ErrCorrupt, r.committed, r.total, bound)
	}

	// Pass 2: for each committed block, the newest version stamped at or
	// below the committed batch; every block but the last must be full and
	// the last must hold exactly the committed count.
	r.idx = newIndex(g.maxClusters)
	r.crcs = make([]uint32, 0, r.total)
	keep := len(keepSlots) > 0 && keepSlots[0]
	if keep {
		r.slots = make([]uint32, 0, r.total)
	}
	block := make([]byte, blockSize)
	nblocks := (int64(r.total) + entriesPerBlock - 1) / entriesPerBlock
	for l := int64(0); l < nblocks; l++ {
		phys := -1
		for s, st := range stamps[l] {
			if st.valid && st.batch <= r.committed && (phys < 0 || st.batch > stamps[l][phys].batch) {
				phys = s
			}
		}
		if phys < 0 {
			return nil, fmt.Errorf("%w: committed metadata block %d has no valid version", ErrCorrupt, l)
		}
		m, err := readBlock(f, block, l, phys, h, g)
		if err != nil {
			return nil, err
		}
		if want := blockEntries(l, r.total); len(m.entries) != want {
			return nil, fmt.Errorf("%w: metadata block %d (batch %d) holds %d entries, the committed state needs %d",
				ErrCorrupt, l, m.batch, len(m.entries), want)
		}
		for i, e := range m.entries {
			slot := uint32(l*entriesPerBlock) + uint32(i)
			if !r.idx.insert(e.cluster, slot) {
				return nil, fmt.Errorf("%w: cluster %d claimed twice (again by data slot %d)", ErrCorrupt, e.cluster, slot)
			}
			r.crcs = append(r.crcs, e.crc)
			if keep {
				r.slots = append(r.slots, e.cluster)
			}
		}
		if keep {
			r.chosen = append(r.chosen, int8(phys))
		}
		if l == nblocks-1 && r.total%entriesPerBlock != 0 {
			r.tail, r.tailSlot = m.entries, phys
		}
	}
	return r, nil
}

// gapIsDamage looks past the block gap where pass 1 stopped. A crash can
// leave gap without a valid version only if the batch in flight was the
// first to write it; then every batch stamped in block gap+1 began in gap or
// before. A version of gap+1 written by a batch that began after gap proves
// gap was full and durable when that batch began (committed counts never
// shrink, and a full block is never rewritten), so it was damaged since.
func gapIsDamage(f vfs.File, g geometry, h Header, gap int64) error {
	if gap+1 >= g.metaBlocks {
		return nil
	}
	buf := make([]byte, 2*blockSize)
	if err := readFull(f, buf, metaOff(gap+1, 0)); err != nil {
		return fmt.Errorf("read metadata block %d: %w", gap+1, err)
	}
	for s := 0; s < 2; s++ {
		m, err := decodeMetaBlock(buf[s*blockSize:], gap+1, h.UUID, g.maxClusters, false)
		if err == nil && int64(m.first) >= (gap+1)*entriesPerBlock {
			return fmt.Errorf("%w: metadata block %d has no valid version, but block %d holds batch %d, which began after block %d was full",
				ErrCorrupt, gap, gap+1, m.batch, gap)
		}
	}
	return nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// readBlock reads and fully decodes physical slot phys of logical block l.
// Pass 1 found it valid, so a failure now is corruption (or the file changing
// under us).
func readBlock(f vfs.File, buf []byte, l int64, phys int, h Header, g geometry) (metaBlock, error) {
	if err := readFull(f, buf, metaOff(l, phys)); err != nil {
		return metaBlock{}, fmt.Errorf("read metadata block %d slot %d: %w", l, phys, err)
	}
	m, err := decodeMetaBlock(buf, l, h.UUID, g.maxClusters, true)
	if err != nil {
		return metaBlock{}, fmt.Errorf("%w: metadata block %d slot %d: %v", ErrCorrupt, l, phys, err)
	}
	return m, nil
}

// batchComplete reports whether every block batch bi wrote has a valid
// version stamped with it and every entry it added has data matching its
// CRC. When it is not complete, why says what is missing, and known holds
// the entries the batch added that a valid version of its blocks records
// (all of them when only data is missing or damaged).
func batchComplete(f vfs.File, g geometry, h Header, stamps [][2]stamp, bi batchInfo) (why string, known []entry, err error) {
	firstL, lastL := int64(bi.first)/entriesPerBlock, int64(bi.total-1)/entriesPerBlock
	type version struct {
		l    int64
		phys int
	}
	var found []version
	for l := firstL; l <= lastL; l++ {
		switch {
		case l >= int64(len(stamps)):
			if why == "" {
				why = fmt.Sprintf("metadata block %d has no valid version", l)
			}
		case stamps[l][0].valid && stamps[l][0].batch == bi.batch:
			found = append(found, version{l, 0})
		case stamps[l][1].valid && stamps[l][1].batch == bi.batch:
			found = append(found, version{l, 1})
		case why == "":
			why = fmt.Sprintf("metadata block %d has no valid version of it", l)
		}
	}
	block := make([]byte, blockSize)
	data := make([]byte, g.clusterSize)
	for _, v := range found {
		m, err := readBlock(f, block, v.l, v.phys, h, g)
		if err != nil {
			return "", nil, err
		}
		for j, e := range m.entries {
			slot := uint32(v.l*entriesPerBlock) + uint32(j)
			if slot < bi.first {
				continue // an older batch's entry, synced before this batch began
			}
			known = append(known, e)
			if why != "" || h.Bookmark {
				continue // incomplete already, or no data to check
			}
			ok, err := slotMatches(f, g, data, slot, e)
			if err != nil {
				return "", nil, err
			}
			if !ok {
				why = fmt.Sprintf("data slot %d (cluster %d) fails its checksum", slot, e.cluster)
			}
		}
	}
	return why, known, nil
}

// slotMatches reports whether data slot slot holds data with e's CRC.
func slotMatches(f vfs.File, g geometry, buf []byte, slot uint32, e entry) (bool, error) {
	p := buf[:g.clusterLen(e.cluster)]
	if err := readFull(f, p, g.slotOff(slot)); err != nil {
		return false, fmt.Errorf("read data slot %d: %w", slot, err)
	}
	return checksum(p) == e.crc, nil
}
