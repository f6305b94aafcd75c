package vfstest

import (
	"math/rand/v2"
	"sort"
)

// CrashOptions chooses what a simulated crash keeps beyond the durable
// state.
type CrashOptions struct {
	// Rand, when non-nil, keeps a random subset of the unsynced operations
	// of each file, applied in their original order; nil keeps none. Seed
	// it so that a failing case replays.
	Rand *rand.Rand
	// KeepProbability is the chance of keeping each unsynced operation;
	// 0 means 0.5.
	KeepProbability float64
	// TornWrites makes a kept write keep each of its sectors independently
	// (with KeepProbability), as a disk that loses power mid-request does.
	TornWrites bool
	// SectorSize is the tearing granularity; 0 means 512. Sectors are
	// aligned to file offsets, not to the start of the write.
	SectorSize int64
}

// CrashClone returns a new MemFS holding what a crash at this instant would
// leave: every file's durable image, plus, per opts, part of what was not
// synced. It holds every file lock at once, so the clone is one instant
// across all files. Open handles are not carried over; files removed but
// still open are gone. The receiver is unchanged and keeps working.
func (fs *MemFS) CrashClone(opts CrashOptions) *MemFS {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	names := make([]string, 0, len(fs.files))
	for name := range fs.files {
		names = append(names, name)
	}
	// Lock in a fixed order; no other path holds two node locks, so any
	// order is deadlock-free, but a fixed one keeps the random draws
	// replayable for a given seed.
	sort.Strings(names)
	for _, name := range names {
		fs.files[name].mu.RLock()
	}
	defer func() {
		for _, name := range names {
			fs.files[name].mu.RUnlock()
		}
	}()

	p := opts.KeepProbability
	if p == 0 {
		p = 0.5
	}
	sector := opts.SectorSize
	if sector <= 0 {
		sector = 512
	}
	c := NewMemFS()
	for _, name := range names {
		n := fs.files[name]
		img := append([]byte(nil), n.durable...)
		if opts.Rand != nil {
			for _, op := range n.pending {
				if opts.Rand.Float64() >= p {
					continue
				}
				if op.kind == OpWrite && opts.TornWrites {
					img = tornApply(img, op, sector, p, opts.Rand)
					continue
				}
				img = op.apply(img)
			}
		}
		c.files[name] = &node{
			cur:     img,
			durable: append([]byte(nil), img...),
			devSize: n.devSize,
		}
	}
	return c
}

// tornApply applies the sectors of a write that survive, each with
// probability p.
func tornApply(img []byte, op pendingOp, sector int64, p float64, r *rand.Rand) []byte {
	end := op.off + int64(len(op.data))
	for s := op.off; s < end; {
		e := min((s/sector+1)*sector, end)
		if r.Float64() < p {
			img = pendingOp{kind: OpWrite, off: s, data: op.data[s-op.off : e-op.off]}.apply(img)
		}
		s = e
	}
	return img
}
