package backstore

import (
	"math/bits"
	"slices"
)

// index maps a cluster to the data slot holding its copy.
//
// It must stay small for a large, sparsely copied origin: 2^24 clusters
// with 10% copied is 1.68M entries, and a dense []uint32 over all clusters
// would cost 64 MiB. Instead the clusters are grouped in chunks of 1024;
// each chunk has a 1024-bit bitmap of copied clusters and the slots of its
// copied clusters in cluster order, so a lookup is a rank in the bitmap.
// Cost: 152 bytes per chunk (2.5 MiB for 2^24 clusters) plus 4 bytes per
// copied cluster and the slices' growth slack; TestIndexMemory measures it.
//
// index is not synchronised; Store guards it with its RWMutex.
type index struct {
	chunks []indexChunk
	n      int
}

const (
	chunkShift = 10
	chunkWords = 1 << chunkShift / 64
)

type indexChunk struct {
	bits  [chunkWords]uint64
	slots []uint32 // slots[i] belongs to the i-th set bit
}

func newIndex(clusters uint32) index {
	return index{chunks: make([]indexChunk, (int(clusters)+1<<chunkShift-1)>>chunkShift)}
}

// rank returns the chunk of c, whether c is set, and the number of set bits
// before c in its chunk.
func (x *index) rank(c uint32) (*indexChunk, bool, int) {
	ch := &x.chunks[c>>chunkShift]
	w, b := (c>>6)&(chunkWords-1), c&63
	r := 0
	for _, word := range ch.bits[:w] {
		r += bits.OnesCount64(word)
	}
	r += bits.OnesCount64(ch.bits[w] & (1<<b - 1))
	return ch, ch.bits[w]&(1<<b) != 0, r
}

// lookup returns the slot of cluster c, if copied.
func (x *index) lookup(c uint32) (uint32, bool) {
	ch, ok, r := x.rank(c)
	if !ok {
		return 0, false
	}
	return ch.slots[r], true
}

func (x *index) has(c uint32) bool {
	_, ok, _ := x.rank(c)
	return ok
}

// insert records that cluster c lives in slot; it reports false if c was
// already present (and changes nothing).
func (x *index) insert(c, slot uint32) bool {
	ch, ok, r := x.rank(c)
	if ok {
		return false
	}
	ch.bits[(c>>6)&(chunkWords-1)] |= 1 << (c & 63)
	ch.slots = slices.Insert(ch.slots, r, slot)
	x.n++
	return true
}

// forEachInChunk calls fn for each copied cluster of chunk i, in order.
func (ch *indexChunk) forEach(base uint32, fn func(c uint32)) {
	for w, word := range ch.bits {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			fn(base + uint32(w*64+b))
			word &= word - 1
		}
	}
}
