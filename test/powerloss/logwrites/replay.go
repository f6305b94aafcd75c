package logwrites

import (
	"fmt"
	"io"
)

// maxChunk bounds the buffer a Replayer reads and writes through, so that
// replaying an entry of any size (a discard of a whole disk, say) takes at
// most this much memory.
const maxChunk = 1 << 20

// A Replayer applies the entries of a log, in order, to an image of the data
// device. It goes forward only: the image holds the effect of entries
// 0..Next()-1, and there is no way back short of starting again from a fresh
// image.
type Replayer struct {
	log  *Log
	dev  io.WriterAt
	next int
	err  error  // the failure that stopped the replay, if any
	buf  []byte // reused for every chunk, at most maxChunk bytes
}

// NewReplayer returns a Replayer that applies l to dev, which must hold the
// data device as it was when logging started (all zeros for a fresh disk).
// If dev has a fixed size, its WriteAt must fail for writes past its end:
// the Replayer relies on that to reject entries outside the device.
func NewReplayer(l *Log, dev io.WriterAt) *Replayer {
	return &Replayer{log: l, dev: dev}
}

// Next returns the index of the next entry to apply.
func (r *Replayer) Next() int {
	return r.next
}

// ApplyThrough applies every entry not yet applied up to and including entry
// i, leaving the image as the data device was right after entry i. Asking
// for an entry already applied, or past the end of the log, is an error and
// changes nothing. If applying an entry fails, the image holds part of that
// entry; Next stays at it and every later call returns the same error.
func (r *Replayer) ApplyThrough(i int) error {
	if r.err != nil {
		return r.err
	}
	if n := len(r.log.Entries); i < 0 || i >= n {
		return fmt.Errorf("logwrites: cannot apply through entry %d: the log has %d entries", i, n)
	}
	if i < r.next {
		return fmt.Errorf("logwrites: cannot apply through entry %d: entries 0..%d are applied "+
			"already and replay only goes forward", i, r.next-1)
	}
	for ; r.next <= i; r.next++ {
		e := r.log.Entries[r.next]
		if err := r.apply(e); err != nil {
			r.err = fmt.Errorf("logwrites: applying entry %d (%s) at log offset %d: %w",
				e.Index, e, e.logOffset, err)
			return r.err
		}
	}
	return nil
}

// apply applies one entry. Marks and bare flushes change nothing on the
// device.
func (r *Replayer) apply(e Entry) error {
	if e.Flags&Discard != 0 {
		// The content of a discarded range is unspecified: the device may
		// return old data, zeros or anything else. Zeros are what the checks
		// read as "never written", so a file system that relies on discarded
		// blocks keeping their data shows up as corrupt.
		buf := r.chunk(e.Length)
		clear(buf)
		for done := int64(0); done < e.Length; {
			n := min(e.Length-done, int64(len(buf)))
			if err := writeFull(r.dev, buf[:n], e.Offset+done); err != nil {
				return fmt.Errorf("zeroing %d bytes at %d: %w", n, e.Offset+done, err)
			}
			done += n
		}
		return nil
	}
	if !e.hasData() {
		return nil
	}
	buf := r.chunk(e.Length)
	for done := int64(0); done < e.Length; {
		n := min(e.Length-done, int64(len(buf)))
		if err := readFull(r.log.r, buf[:n], e.dataOffset+done); err != nil {
			return fmt.Errorf("reading %d bytes of data at log offset %d: %w",
				n, e.dataOffset+done, err)
		}
		if err := writeFull(r.dev, buf[:n], e.Offset+done); err != nil {
			return fmt.Errorf("writing %d bytes at %d: %w", n, e.Offset+done, err)
		}
		done += n
	}
	return nil
}

// chunk returns a buffer of min(n, maxChunk) bytes with unspecified content.
// It grows the reused buffer at least twofold, so that a run of growing
// entries does not allocate for each one.
func (r *Replayer) chunk(n int64) []byte {
	n = min(n, maxChunk)
	if int64(cap(r.buf)) < n {
		r.buf = make([]byte, min(max(n, 2*int64(cap(r.buf))), maxChunk))
	}
	return r.buf[:n]
}

// writeFull writes all of p at off: io.WriterAt must return an error when it
// writes less, but a WriterAt that does not is caught here rather than
// leaving a silent hole in the image.
func writeFull(w io.WriterAt, p []byte, off int64) error {
	n, err := w.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	return err
}
