package cow

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// bstore adapts *backstore.Store to clusterStore. The Store is given the
// file behind a storeFile, whose Close does nothing, so that a store the
// engine refuses (Reopen of another origin) can be released while the
// caller keeps its file, as Create's and Reopen's contracts say.
type bstore struct {
	s       *backstore.Store
	f       vfs.File
	sf      *storeFile
	batches sync.Pool // *[]backstore.Cluster: two commits may run at once
}

func newBstore(s *backstore.Store, f vfs.File, sf *storeFile) *bstore {
	b := &bstore{s: s, f: f, sf: sf}
	b.batches.New = func() any { return new([]backstore.Cluster) }
	return b
}

// storeFile is the file as the backing store sees it: Close does nothing,
// and Sync records how long it took (for commit).
type storeFile struct {
	vfs.File
	lastSync atomic.Int64 // nanoseconds
	syncs    atomic.Int64
}

func (*storeFile) Close() error { return nil }

// Deallocate passes hole punching through (a bookmark drops its data).
func (f *storeFile) Deallocate(off, length int64) error {
	if d, ok := f.File.(vfs.Deallocator); ok {
		return d.Deallocate(off, length)
	}
	return errors.ErrUnsupported
}

// StartWriteback passes write-behind through (the store starts writing a
// commit's data back while it writes the rest).
func (f *storeFile) StartWriteback(off, length int64) error {
	if w, ok := f.File.(vfs.WriteBehinder); ok {
		return w.StartWriteback(off, length)
	}
	return errors.ErrUnsupported
}

func (f *storeFile) Sync() error {
	start := time.Now()
	err := f.File.Sync()
	f.lastSync.Store(int64(time.Since(start)))
	f.syncs.Add(1)
	return err
}

func createBackstore(f vfs.File, o storeOptions) (clusterStore, error) {
	sf := &storeFile{File: f}
	var bases []backstore.Base
	for _, b := range o.Bases {
		id, err := uuid.Parse(b.UUID)
		if err != nil {
			return nil, fmt.Errorf("base %q: %w", b.UUID, err)
		}
		bases = append(bases, backstore.Base{UUID: id, Entries: b.Entries})
	}
	s, err := backstore.Create(sf, backstore.Options{
		Name:        o.Name,
		ClusterSize: o.ClusterSize,
		OriginSize:  o.OriginSize,
		OriginID:    o.OriginID,
		Persistent:  o.Persistent,
		MaxSize:     o.MaxSize,
		Created:     o.Created,
		UUID:        o.UUID,
		Bases:       bases,
	})
	if err != nil {
		return nil, err
	}
	return newBstore(s, f, sf), nil
}

// openBackstore reopens a store. origin is the origin as it is now:
// backstore.Open holds the batches a crash left in flight against it,
// which is sound because the engine writes an origin cluster only after the
// batch holding its copy was committed.
func openBackstore(f vfs.File, origin io.ReaderAt, log *slog.Logger) (clusterStore, error) {
	sf := &storeFile{File: f}
	s, err := backstore.Open(sf, origin)
	if err != nil {
		if errors.Is(err, backstore.ErrTransient) {
			return nil, fmt.Errorf("%w: %w", err, ErrBadOption)
		}
		return nil, err
	}
	// A batch in flight at a crash is dropped, which is safe (its origin
	// writes were never issued) but worth a line: it says the last
	// shutdown was not clean. A damaged committed state (found by the
	// clean mark, or by a dropped batch the origin proves committed)
	// turns the store invalid instead, and the engine reports that.
	rec := s.Recovery()
	for _, d := range rec.Dropped {
		if !d.Leftover {
			log.Info("store recovery dropped the batch in flight at a crash",
				"store", s.Header().Name, "batch", d.Batch, "entries", fmt.Sprintf("%d…%d", d.First, d.Total-1), "why", d.Why)
		}
	}
	return newBstore(s, f, sf), nil
}

// commit reports the store's latest sync time if the store synced during
// it: with two commits at once, that may be the other's, which serves the
// committer's average as well.
func (b *bstore) commit(batch []storeCluster) (time.Duration, error) {
	bp := b.batches.Get().(*[]backstore.Cluster)
	cs := (*bp)[:0]
	for _, c := range batch {
		cs = append(cs, backstore.Cluster{Index: c.index, Data: c.data})
	}
	syncs := b.sf.syncs.Load()
	err := b.s.Commit(cs)
	clear(cs)
	*bp = cs[:0]
	b.batches.Put(bp)
	var took time.Duration
	if b.sf.syncs.Load() != syncs {
		took = time.Duration(b.sf.lastSync.Load())
	}
	return took, err
}

func (b *bstore) readCluster(index uint32, p []byte, off int) (bool, error) {
	return b.s.ReadCluster(index, p, off)
}

func (b *bstore) forEachCopied(fn func(uint32))     { b.s.ForEachCopied(fn) }
func (b *bstore) entry(index uint32) (uint32, bool) { return b.s.Entry(index) }
func (b *bstore) count() uint32                     { return uint32(b.s.CopiedCount()) }
func (b *bstore) bookmark() error                   { return b.s.Bookmark() }

func (b *bstore) header() storeHeader {
	h := b.s.Header()
	var bases []storeBase
	for _, base := range h.Bases {
		bases = append(bases, storeBase{UUID: base.UUID.String(), Entries: base.Entries})
	}
	return storeHeader{
		UUID:        h.UUID.String(),
		Name:        h.Name,
		Created:     h.Created,
		ClusterSize: h.ClusterSize,
		OriginSize:  h.OriginSize,
		OriginID:    h.OriginID,
		Persistent:  h.Persistent,
		Valid:       h.State == backstore.StateValid,
		Reason:      h.Reason,
		Bookmark:    h.Bookmark,
		Bases:       bases,
	}
}

func (b *bstore) invalidate(reason string) error { return b.s.Invalidate(reason) }
func (b *bstore) bytes() int64                   { return b.s.Bytes() }
func (b *bstore) close() error                   { return errors.Join(b.s.Close(), b.f.Close()) }
func (b *bstore) release() error                 { return b.s.Close() }
