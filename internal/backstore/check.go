package backstore

import (
	"fmt"
	"strings"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Report is what Check found.
type Report struct {
	Header Header
	// HeaderSlots holds each header slot's problem, "" when valid. One bad
	// slot is normal after a crash during a header write.
	HeaderSlots [2]string
	Transient   bool
	// For a persistent store: the last committed batch, the clusters it
	// holds, the metadata blocks the scan found, and the batches recovery
	// drops (in flight at a crash, or left behind by an earlier recovery),
	// by number and in detail.
	CommittedBatch uint64
	Clusters       int
	MetaBlocks     int64
	DroppedBatches []uint64
	Dropped        []DroppedBatch
	// Recovery is what Open would find (Check itself writes nothing).
	// Recovery.Corrupt is also listed in Problems.
	Recovery Recovery
	// Notices lists what is normal but worth saying: a batch dropped after
	// a crash, a stale clean mark.
	Notices []string
	// DataVerified is how many clusters' data matched their CRC.
	DataVerified int
	// Problems lists every inconsistency; Check returns an error iff it is
	// not empty.
	Problems []string
}

// CheckOptions tune Check.
type CheckOptions struct {
	// SkipData skips reading every copied cluster to verify its CRC.
	SkipData bool
	// Progress, if set, is called after each copied cluster's data was
	// read, with how many of the total have been: reading them all is what
	// takes long on a large store.
	Progress func(done, total int)
}

// Check validates a store without changing it: both header slots, every
// metadata block of the committed state (valid, full where it must be, its
// entries in range, no cluster claimed twice), and the CRC of every copied
// cluster's data. A store closed cleanly whose committed state is not
// whole is a problem (Open would make it invalid); batches recovery would
// drop after a crash are notices. For a transient store only the header can
// be checked.
// The error wraps ErrCorrupt (or the header's error) and names the first
// problem; the Report lists them all.
func Check(f vfs.File) (Report, error) {
	return CheckWithOptions(f, CheckOptions{})
}

// CheckWithOptions is Check with options.
func CheckWithOptions(f vfs.File, opts CheckOptions) (Report, error) {
	var rep Report
	h, slotErr, err := readHeader(f)
	for i, e := range slotErr {
		if e != nil {
			rep.HeaderSlots[i] = e.Error()
		}
	}
	if err != nil {
		rep.Problems = append(rep.Problems, err.Error())
		return rep, fmt.Errorf("backstore: check: %w", err)
	}
	rep.Header = h
	if !h.Persistent {
		rep.Transient = true
		return rep, nil
	}
	r, err := recoverMap(f, h, true)
	if err != nil {
		rep.Problems = append(rep.Problems, err.Error())
		return rep, fmt.Errorf("backstore: check: %w", err)
	}
	rep.CommittedBatch, rep.Clusters, rep.MetaBlocks = r.committed, len(r.slots), r.scanned
	rep.Recovery = r.recovery(h)
	rep.Dropped = r.dropped
	for _, d := range r.dropped {
		rep.DroppedBatches = append(rep.DroppedBatches, d.Batch)
		if d.Batch != h.CleanBatch || !rep.Recovery.Clean {
			rep.Notices = append(rep.Notices, d.String())
		}
	}
	for _, u := range r.unreadable {
		rep.Notices = append(rep.Notices, u+" (ignored: torn by a crash, damaged, or left from an earlier use)")
	}
	if rep.Recovery.StaleClean {
		rep.Notices = append(rep.Notices, fmt.Sprintf("the clean mark (batch %d, %d entries) is older than the committed state: a newer header slot was lost", h.CleanBatch, h.CleanCount))
	}
	if rep.Recovery.Corrupt != "" {
		rep.Problems = append(rep.Problems, rep.Recovery.Corrupt)
	}

	if !opts.SkipData && !h.Bookmark {
		// A bookmark has no data to verify. Otherwise recoverMap has verified the committed batch's data; the older
		// batches' data is verified here, slot by slot.
		block := make([]byte, blockSize)
		data := make([]byte, r.geo.clusterSize)
		nblocks := (int64(r.total) + entriesPerBlock - 1) / entriesPerBlock
		for l := int64(0); l < nblocks; l++ {
			phys := int(r.chosen[l])
			m, err := readBlock(f, block, l, phys, h, r.geo)
			if err != nil {
				rep.Problems = append(rep.Problems, err.Error())
				continue
			}
			for j, e := range m.entries {
				slot := uint32(l*entriesPerBlock) + uint32(j)
				ok, err := slotMatches(f, r.geo, data, slot, e)
				if opts.Progress != nil {
					opts.Progress(int(slot)+1, int(r.total))
				}
				switch {
				case err != nil:
					rep.Problems = append(rep.Problems, err.Error())
				case !ok:
					rep.Problems = append(rep.Problems, fmt.Sprintf("data slot %d (cluster %d, block %d slot %d): CRC mismatch", slot, e.cluster, l, phys))
				default:
					rep.DataVerified++
				}
			}
		}
	}
	if len(rep.Problems) > 0 {
		more := ""
		if len(rep.Problems) > 1 {
			more = fmt.Sprintf(" (and %d more)", len(rep.Problems)-1)
		}
		// The first problem without the words the error already starts with.
		first := strings.TrimPrefix(strings.TrimPrefix(rep.Problems[0], ErrCorrupt.Error()+": "), "store corrupt: ")
		return rep, fmt.Errorf("backstore: check: %w: %s%s", ErrCorrupt, first, more)
	}
	return rep, nil
}
