package daemon

import (
	"context"

	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/nbdsrv"
)

// The base:allocation map of both kinds of export: cow answers holes and
// data in its own terms, these adapters put them in NBD's. A hole is
// NBD_STATE_HOLE|NBD_STATE_ZERO (a hole reads as zeros), data 0.

var (
	_ nbdsrv.Extenter = originBackend{}
	_ nbdsrv.Extenter = snapshotBackend{}
)

// Extents answers base:allocation on the origin export from the origin's
// own holes. It hides the promoted cow.Engine.Extents, whose type nbdsrv
// does not know.
func (b originBackend) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	exts, err := b.Engine.Extents(ctx, off, length)
	return nbdExtents(exts), err
}

// snapshotBackend serves a snapshot as its read-only export: the snapshot
// itself (ReadAt), plus its allocation map in nbdsrv's terms.
type snapshotBackend struct{ *cow.Snapshot }

// Extents answers base:allocation on a snapshot export: holes where the
// origin was a hole at the create instant and nothing was copied since.
func (b snapshotBackend) Extents(ctx context.Context, off, length int64) ([]nbdsrv.Extent, error) {
	exts, err := b.Snapshot.Extents(ctx, off, length)
	return nbdExtents(exts), err
}

func nbdExtents(exts []cow.Extent) []nbdsrv.Extent {
	if exts == nil {
		return nil
	}
	out := make([]nbdsrv.Extent, len(exts))
	for i, e := range exts {
		out[i].Length = e.Length
		if e.Hole {
			out[i].Flags = nbdsrv.ExtentHole | nbdsrv.ExtentZero
		}
	}
	return out
}
