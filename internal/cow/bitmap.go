package cow

import "sync/atomic"

// bitmap is the copied bitmap (fss sc_copied). Bits are only ever set, and
// only under the owning cache's mutex; they are read without the mutex by
// snapshot reads, hence the atomic words.
type bitmap []atomic.Uint64

func newBitmap(n uint32) bitmap { return make(bitmap, (uint64(n)+63)/64) }

func (b bitmap) get(i uint32) bool { return b[i>>6].Load()&(1<<(i&63)) != 0 }

// set sets bit i and reports whether it was clear.
func (b bitmap) set(i uint32) bool {
	m := uint64(1) << (i & 63)
	return b[i>>6].Or(m)&m == 0
}
