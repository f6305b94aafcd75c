package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Allocation maps: which ranges of the origin, or of a snapshot's frozen
// image, are holes (read as zeros, hold no storage) and which are data.
// They serve NBD's base:allocation context, so that a client copying an
// export (nbdcopy, qemu-img convert) skips the holes instead of reading
// and writing their zeros.

// Extent is one run of an allocation map: Length bytes of hole or data.
// An Extents answer is a list of consecutive runs from the offset asked.
type Extent struct {
	Length int64
	Hole   bool // reads as zeros and holds no storage
}

// maxExtents bounds the runs one Extents call returns, and with them the
// system calls and memory it costs: the caller asks again from where the
// answer ended (an NBD client does, and the server sends at most a few
// thousand descriptors per reply anyway).
const maxExtents = 1024

// extentList builds an Extents answer, joining neighbours of one kind.
type extentList []Extent

func (l *extentList) add(n int64, hole bool) {
	if n <= 0 {
		return
	}
	if k := len(*l); k > 0 && (*l)[k-1].Hole == hole {
		(*l)[k-1].Length += n
		return
	}
	*l = append(*l, Extent{Length: n, Hole: hole})
}

// Extents maps the origin over [off, off+length): its holes where the
// origin is a file that tells them (vfs.DataSeeker: SEEK_DATA and
// SEEK_HOLE on a regular file), data elsewhere. A block device is all data
// (see vfs.DataSeeker). The answer covers at least one byte of a non-empty
// range and may stop short of its end (at most maxExtents runs). It is a
// picture of a moment: a write racing it may turn a hole reported into
// data, as with any server.
func (e *Engine) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := e.checkRange(off, length); err != nil {
		return nil, err
	}
	if e.active() != nil {
		// The origin's holes are not the rollback's: all of it is data,
		// which is never wrong.
		var out extentList
		out.add(length, false)
		return out, nil
	}
	// A held write (held.go) to a hole is not in the file yet: the map
	// waits for the held writes it overlaps, as a read does, or a client
	// would skip the data it was told is written.
	e.held.waitOverlaps(off, length)
	exts, err := originExtents(e.origin, off, off+length)
	if err != nil {
		return nil, fmt.Errorf("cow: origin: %w", err)
	}
	return exts, nil
}

// originExtents maps f over [off, end), at most maxExtents runs.
func originExtents(f vfs.File, off, end int64) ([]Extent, error) {
	var out extentList
	ds, ok := f.(vfs.DataSeeker)
	if !ok {
		out.add(end-off, false)
		return out, nil
	}
	// A hole found by SeekData may fill with data before SeekHole runs,
	// and data be punched: then SeekHole answers the position itself and
	// the loop asks again. The bound on rounds keeps a file changing
	// under every call from holding it; what is left unmapped then is
	// reported as data, which is never wrong for a file.
	pos := off
	for round := 0; pos < end && len(out) < maxExtents && round < 2*maxExtents; round++ {
		d, err := ds.SeekData(pos)
		switch {
		case errors.Is(err, io.EOF):
			d = end
		case errors.Is(err, errors.ErrUnsupported):
			out.add(end-pos, false)
			return out, nil
		case err != nil:
			return nil, fmt.Errorf("find data from %d: %w", pos, err)
		}
		if d = min(max(d, pos), end); d > pos {
			out.add(d-pos, true)
			pos = d
			continue
		}
		h, err := ds.SeekHole(pos)
		if err != nil {
			return nil, fmt.Errorf("find a hole from %d: %w", pos, err)
		}
		if h = min(h, end); h > pos {
			out.add(h-pos, false)
			pos = h
		}
	}
	if len(out) == 0 {
		out.add(end-off, false)
	}
	return out, nil
}

// Extents maps the frozen image over [off, off+length): a hole where the
// origin was a hole at the create instant and the cluster has not been
// copied since, data elsewhere. A copied cluster is data, even one copied
// from a hole (the store holds its zeros); of a cluster partly hole at the
// create instant and not copied, only the hole part is a hole. The answer
// covers at least one byte of a non-empty range and may stop short of its
// end (at most maxExtents runs).
//
// Why this is race-free (the reasoning of ReadAt): a request modifies the
// origin within cluster c only after c's copied bit is set (copyCluster),
// and an uncopied cluster of the origin is unchanged since the create
// instant. The origin's holes are asked first and the copied bits checked
// only after the answer came: a cluster whose bit is clear at the check
// was not modified while the origin was asked, so a hole found in it was a
// hole at the create instant; a cluster whose bit is set is data whatever
// the origin said. The other order would be wrong: a cluster copied and
// then trimmed between the check and the question would show the origin's
// new hole over the old data the snapshot holds. If the snapshot became
// invalid, copy-on-write may have been skipped for it, so the check of
// invalid after the work turns the answer into an error.
func (s *Snapshot) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkRange(s.geo.size, off, length); err != nil {
		return nil, err
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if err := s.readable(); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	origin, err := originExtents(s.e.origin, off, off+length)
	if err != nil {
		return nil, fmt.Errorf("cow: snapshot %q: origin: %w", s.name, err)
	}
	// Only now the copied bits (see above).
	var out extentList
	pos := off
	for _, x := range origin {
		end := pos + x.Length
		if !x.Hole {
			out.add(x.Length, false)
		}
		for p := pos; x.Hole && p < end && len(out) < maxExtents; {
			// A run of clusters copied alike, clipped to the hole.
			first, last := s.geo.span(p, end-p)
			runEnd := min(end, s.geo.off(s.cache.copied.runEnd(first, last)))
			out.add(runEnd-p, !s.cache.copied.get(first))
			p = runEnd
		}
		if len(out) >= maxExtents {
			break
		}
		pos = end
	}
	if err := s.readable(); err != nil {
		return nil, err
	}
	return out, nil
}

// runEnd returns the first cluster after c, up to last+1, whose bit
// differs from c's: [c, runEnd) is a run of clusters all copied or all
// not. It reads a word of bits at a time, so a long hole costs a load per
// 64 clusters.
func (b bitmap) runEnd(c, last uint32) uint32 {
	set := b.get(c)
	for i := c + 1; i <= last; i = (i | 63) + 1 {
		w := b[i>>6].Load()
		if set {
			w = ^w
		}
		// The bits of clusters i and after, within this word; a set bit
		// is a cluster that differs from c.
		if w >>= i & 63; w != 0 {
			return min(i+uint32(bits.TrailingZeros64(w)), last+1)
		}
	}
	return last + 1
}
