package backstore

import "sync"

// Partial reads. A cluster's checksum covers the whole cluster, so a read
// of part of a cluster must read and checksum all of it: a 4 KiB read of a
// 64 KiB cluster does 16 times the I/O and the CRC work it returns, which
// made 4k random reads of a snapshot markedly slower. So when a
// partial read has checked a whole cluster, the store keeps the CRC32C of
// each of the cluster's 4 KiB blocks for a while, and a later partial read
// of that cluster reads and checks only the blocks it returns. The block
// sums are computed from bytes that had just matched the checksum the
// cluster was committed with, and data slots are never rewritten, so a
// block that matches its sum is the committed data, and one damaged since
// fails just as the whole cluster would.
//
// The sums are a bounded cache per store (blockSumsMax clusters, about 100
// bytes each with a 64 KiB cluster): a cluster evicted, or never read in
// part, is read whole again. Whole-cluster reads (sequential reads) neither
// use nor fill it: their single checksum is already the least work.
const (
	sumBlock     = 4096
	blockSumsMax = 16384
)

// blockSums maps a cluster to the CRC32C of each of its sumBlock blocks
// (the last one possibly shorter), evicting the oldest entry when full.
type blockSums struct {
	mu   sync.Mutex
	sums map[uint32][]uint32
	ring []uint32 // clusters in the order they were added
	next int      // the ring's oldest entry once it is full
}

func (b *blockSums) get(c uint32) []uint32 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sums[c]
}

// add records the block sums of cluster c, computed from its data.
func (b *blockSums) add(c uint32, data []byte) {
	sums := make([]uint32, 0, (len(data)+sumBlock-1)/sumBlock)
	for off := 0; off < len(data); off += sumBlock {
		sums = append(sums, checksum(data[off:min(off+sumBlock, len(data))]))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sums == nil {
		b.sums = make(map[uint32][]uint32)
	}
	if _, ok := b.sums[c]; ok {
		return
	}
	if len(b.ring) < blockSumsMax {
		b.ring = append(b.ring, c)
	} else {
		delete(b.sums, b.ring[b.next])
		b.ring[b.next] = c
		b.next = (b.next + 1) % blockSumsMax
	}
	b.sums[c] = sums
}
