package cow

import (
	"fmt"
	"math/bits"
)

// Cluster size limits (fss_create_snapshot). A user may ask for any power of
// two in [MinClusterSize, MaxClusterSize]; the engine raises it on its own
// when the origin would otherwise have more than MaxClusters clusters.
const (
	DefaultClusterSize = 64 << 10
	MinClusterSize     = 4 << 10
	MaxClusterSize     = 1 << 20
	// MaxClusters is fss's FSS_CLUSTER_MAX: cluster indices fit in a
	// uint32 and the copied bitmap of any origin stays at most 2 MiB.
	MaxClusters = 1 << 24
	// maxRaisedClusterSize bounds the automatic raise: the backing store
	// takes clusters up to MaxClusterSize, so origins above 16 TiB are
	// refused.
	maxRaisedClusterSize = MaxClusterSize
	// MaxOriginSize is the largest origin a snapshot can cover, 16 TiB:
	// MaxClusters clusters of the largest size.
	MaxOriginSize = int64(MaxClusters) * maxRaisedClusterSize
)

// ClusterSize returns the cluster size a snapshot of an origin of size
// bytes gets when req is asked for (0 = DefaultClusterSize): req, doubled
// until the origin has at most MaxClusters clusters. So the smallest size
// an origin allows is size / 2^24 rounded up to a power of two: 4 KiB up to
// 64 GiB, 64 KiB up to 1 TiB, 1 MiB up to 16 TiB. Origins over
// MaxOriginSize cannot be snapshotted at all.
func ClusterSize(size int64, req int) (int, error) {
	g, err := newGeometry(size, req)
	if err != nil {
		return 0, err
	}
	return g.csize, nil
}

// geometry maps origin byte offsets to clusters for one snapshot.
type geometry struct {
	size    int64  // origin size in bytes
	csize   int    // cluster size, a power of two
	shift   uint   // log2(csize)
	count   uint32 // number of clusters; the last one may be partial
	lastLen int    // bytes of the last cluster that lie inside the origin
}

// newGeometry validates a requested cluster size (0 = default) and raises it
// until the origin has at most MaxClusters clusters.
func newGeometry(size int64, req int) (geometry, error) {
	if size <= 0 {
		return geometry{}, fmt.Errorf("cow: origin size %d: %w", size, ErrBadOption)
	}
	cs := req
	if cs == 0 {
		cs = DefaultClusterSize
	}
	if cs < MinClusterSize || cs > MaxClusterSize || cs&(cs-1) != 0 {
		return geometry{}, fmt.Errorf("cow: cluster size %d is not a power of two in [%d, %d]: %w",
			cs, MinClusterSize, MaxClusterSize, ErrBadOption)
	}
	if size > MaxOriginSize {
		return geometry{}, fmt.Errorf("cow: the origin is %d bytes, over 16 TiB (%d bytes), the largest a snapshot can cover (%d clusters of at most 1 MiB): %w",
			size, MaxOriginSize, MaxClusters, ErrBadOption)
	}
	for (size+int64(cs)-1)/int64(cs) > MaxClusters {
		cs <<= 1
		if cs > maxRaisedClusterSize {
			return geometry{}, fmt.Errorf("cow: origin of %d bytes needs clusters above %d bytes: %w",
				size, maxRaisedClusterSize, ErrBadOption)
		}
	}
	return geometryOf(size, cs), nil
}

// geometryOf builds the geometry for a cluster size already validated (for
// example read back from a store header).
func geometryOf(size int64, cs int) geometry {
	count := (size + int64(cs) - 1) / int64(cs)
	return geometry{
		size:    size,
		csize:   cs,
		shift:   uint(bits.TrailingZeros(uint(cs))),
		count:   uint32(count),
		lastLen: int(size - (count-1)*int64(cs)),
	}
}

// span returns the first and last cluster touched by [off, off+n), n > 0.
func (g geometry) span(off, n int64) (first, last uint32) {
	return uint32(off >> g.shift), uint32((off + n - 1) >> g.shift)
}

// clusterLen is the number of origin bytes in cluster c.
func (g geometry) clusterLen(c uint32) int {
	if c == g.count-1 {
		return g.lastLen
	}
	return g.csize
}

// off is the origin offset of cluster c.
func (g geometry) off(c uint32) int64 { return int64(c) << g.shift }

// cacheSlots is the number of cache slots for a byte budget: the budget
// divided by the cluster size, but never fewer than fss had (32 slots up to
// 8 KiB clusters, 8 up to 64 KiB, 4 above).
func cacheSlots(csize int, budget int64) int {
	floor := 4
	switch {
	case csize <= 8<<10:
		floor = 32
	case csize <= 64<<10:
		floor = 8
	}
	n := budget / int64(csize)
	if n < int64(floor) {
		return floor
	}
	if n > 1<<16 {
		n = 1 << 16
	}
	return int(n)
}
