package backstore

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Rollback progress file: see "Rollback progress" in format.go.

const (
	progressMagic   = "NBSROLLB"
	progressVersion = 1

	progressHeaderSize = 4096
	progressPage       = 4096
	// The header's fields and CRC fit in its first sector, which a disk
	// writes whole: the commit point is never torn (see format.go).
	progressCRCOff = 508

	progressFlagConsume = 1 << 0
)

// ProgressInfo describes a rollback: which store it restores and how far
// that store had got at the rollback instant.
type ProgressInfo struct {
	// UUID is the source store's UUID.
	UUID uuid.UUID
	// ClusterSize and OriginSize are the source store's geometry.
	ClusterSize int
	OriginSize  int64
	// Entries is the source store's entry count at the rollback instant:
	// the clusters to restore are those with an entry number below it.
	Entries uint32
	// Started is the rollback instant.
	Started time.Time
	// Consume: the owner clears the source snapshot when the rollback is
	// complete.
	Consume bool
	// Rate bounds the restore, in bytes per second (0: no bound).
	Rate int64
}

// Clusters is how many clusters the origin has at the info's cluster size.
func (pi ProgressInfo) Clusters() uint32 {
	return uint32((pi.OriginSize + int64(pi.ClusterSize) - 1) / int64(pi.ClusterSize))
}

func (pi ProgressInfo) check() error {
	cs := pi.ClusterSize
	switch {
	case cs < MinClusterSize || cs > MaxClusterSize || cs&(cs-1) != 0:
		return fmt.Errorf("cluster size %d", cs)
	case pi.OriginSize <= 0 || (pi.OriginSize-1)/int64(cs)+1 > MaxClusters:
		return fmt.Errorf("origin size %d at cluster size %d", pi.OriginSize, cs)
	case pi.Entries > pi.Clusters():
		return fmt.Errorf("%d entries for %d clusters", pi.Entries, pi.Clusters())
	case pi.Rate < 0:
		return fmt.Errorf("rate %d", pi.Rate)
	}
	return nil
}

// Progress is an open rollback progress file: the set of clusters restored,
// in memory, and which of its pages changed since the last Sync.
type Progress struct {
	f    vfs.File
	info ProgressInfo

	mu    sync.Mutex
	bits  []byte       // bit c: cluster c restored (not necessarily durable yet)
	dirty map[int]bool // pages of bits changed since the last Sync
	done  uint32
	// syncMu makes Syncs one at a time, so that a page written by an
	// earlier Sync is never written over by an older copy.
	syncMu sync.Mutex
}

func encodeProgressHeader(pi ProgressInfo) []byte {
	b := make([]byte, progressHeaderSize)
	copy(b[0:8], progressMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], progressVersion)
	var flags uint32
	if pi.Consume {
		flags |= progressFlagConsume
	}
	le.PutUint32(b[12:], flags)
	copy(b[16:32], pi.UUID[:])
	le.PutUint32(b[32:], uint32(pi.ClusterSize))
	le.PutUint32(b[36:], pi.Clusters())
	le.PutUint64(b[40:], uint64(pi.OriginSize))
	le.PutUint32(b[48:], pi.Entries)
	if !pi.Started.IsZero() {
		le.PutUint64(b[56:], uint64(pi.Started.UnixNano()))
	}
	le.PutUint64(b[64:], uint64(pi.Rate))
	le.PutUint32(b[progressCRCOff:], checksum(b[:progressCRCOff]))
	return b
}

func decodeProgressHeader(b []byte) (ProgressInfo, error) {
	if len(b) != progressHeaderSize {
		return ProgressInfo{}, fmt.Errorf("%w: progress header is %d bytes", ErrCorrupt, len(b))
	}
	if allZero(b) {
		return ProgressInfo{}, ErrNoProgress
	}
	le := binary.LittleEndian
	// The magic and the version first, so that a newer format is refused
	// as such whatever its layout after them.
	switch {
	case string(b[0:8]) != progressMagic:
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress: bad magic %q", ErrCorrupt, b[0:8])
	case le.Uint32(b[8:]) > progressVersion:
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress version %d, this program reads %d", ErrVersion, le.Uint32(b[8:]), progressVersion)
	case le.Uint32(b[8:]) != progressVersion:
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress version %d", ErrCorrupt, le.Uint32(b[8:]))
	case le.Uint32(b[progressCRCOff:]) != checksum(b[:progressCRCOff]):
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress: header fails its checksum", ErrCorrupt)
	case le.Uint32(b[12:])&^progressFlagConsume != 0:
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress flags %#x", ErrCorrupt, le.Uint32(b[12:]))
	case !allZero(b[72:progressCRCOff]) || !allZero(b[52:56]) || !allZero(b[progressCRCOff+4:]):
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress: reserved header bytes are not zero", ErrCorrupt)
	}
	pi := ProgressInfo{
		Consume:     le.Uint32(b[12:])&progressFlagConsume != 0,
		ClusterSize: int(le.Uint32(b[32:])),
		OriginSize:  int64(le.Uint64(b[40:])),
		Entries:     le.Uint32(b[48:]),
		Rate:        int64(le.Uint64(b[64:])),
	}
	if ns := int64(le.Uint64(b[56:])); ns != 0 {
		pi.Started = time.Unix(0, ns).UTC()
	}
	copy(pi.UUID[:], b[16:32])
	if err := pi.check(); err != nil {
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress: %v", ErrCorrupt, err)
	}
	if n := le.Uint32(b[36:]); n != pi.Clusters() {
		return ProgressInfo{}, fmt.Errorf("%w: rollback progress: %d clusters recorded, the geometry has %d", ErrCorrupt, n, pi.Clusters())
	}
	return pi, nil
}

func bitmapBytes(clusters uint32) int64 { return (int64(clusters) + 7) / 8 }

// CreateProgress starts a rollback's progress file in f, which must be a
// regular file; whatever f held is discarded. The bitmap (all clear, and
// allocated) is made durable first, then the header: the header's sync is
// the rollback's commit point, and a crash before it leaves a file
// OpenProgress answers ErrNoProgress for. On success the Progress owns f.
func CreateProgress(f vfs.File, pi ProgressInfo) (*Progress, error) {
	if err := pi.check(); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: %w: %v", ErrOptions, err)
	}
	n := bitmapBytes(pi.Clusters())
	if err := f.Truncate(0); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: %w", err)
	}
	if err := f.Truncate(progressHeaderSize + n); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: %w", err)
	}
	// The bitmap is written, not left a hole, so that its blocks are
	// allocated now: a page written later (a FLUSH's checkpoint) then
	// cannot fail for want of space.
	zeros := make([]byte, min(n, 1<<20))
	for off := int64(0); off < n; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), n-off)], progressHeaderSize+off); err != nil {
			return nil, fmt.Errorf("backstore: rollback progress: write bitmap: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: sync bitmap: %w", err)
	}
	if _, err := f.WriteAt(encodeProgressHeader(pi), 0); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: write header: %w", err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: sync header: %w", err)
	}
	return &Progress{f: f, info: pi, bits: make([]byte, n), dirty: make(map[int]bool)}, nil
}

// OpenProgress reads a rollback progress file. It answers ErrNoProgress for
// a file whose rollback was never committed (shorter than a header, or a
// header of zeros: see CreateProgress), ErrVersion for a newer format, and
// ErrCorrupt for anything no crash leaves. On success the Progress owns f.
func OpenProgress(f vfs.File) (*Progress, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: %w", err)
	}
	if size < progressHeaderSize {
		return nil, fmt.Errorf("backstore: rollback progress (%d bytes): %w", size, ErrNoProgress)
	}
	h := make([]byte, progressHeaderSize)
	if err := readFull(f, h, 0); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: read header: %w", err)
	}
	pi, err := decodeProgressHeader(h)
	if err != nil {
		return nil, fmt.Errorf("backstore: %w", err)
	}
	n := bitmapBytes(pi.Clusters())
	if size < progressHeaderSize+n {
		return nil, fmt.Errorf("backstore: %w: rollback progress is %d bytes, its bitmap needs %d", ErrCorrupt, size, progressHeaderSize+n)
	}
	p := &Progress{f: f, info: pi, bits: make([]byte, n), dirty: make(map[int]bool)}
	if err := readFull(f, p.bits, progressHeaderSize); err != nil {
		return nil, fmt.Errorf("backstore: rollback progress: read bitmap: %w", err)
	}
	var done uint64
	for _, b := range p.bits {
		done += uint64(bits.OnesCount8(b))
	}
	if extra := pi.Clusters() % 8; extra != 0 && p.bits[n-1]>>extra != 0 {
		return nil, fmt.Errorf("backstore: %w: rollback progress marks clusters beyond the origin's %d", ErrCorrupt, pi.Clusters())
	}
	if done > uint64(pi.Entries) {
		return nil, fmt.Errorf("backstore: %w: rollback progress marks %d clusters restored of %d", ErrCorrupt, done, pi.Entries)
	}
	p.done = uint32(done)
	return p, nil
}

// Info describes the rollback.
func (p *Progress) Info() ProgressInfo { return p.info }

// Restored reports whether cluster c is marked restored.
func (p *Progress) Restored(c uint32) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return c < p.info.Clusters() && p.bits[c/8]&(1<<(c%8)) != 0
}

// Done is how many clusters are marked restored.
func (p *Progress) Done() uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Complete reports whether every cluster to restore is marked restored.
func (p *Progress) Complete() bool { return p.Done() == p.info.Entries }

// Mark marks cluster c restored, in memory; Sync makes it durable. The
// caller marks a cluster only once its origin write completed, and at most
// Entries clusters in all.
func (p *Progress) Mark(c uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c >= p.info.Clusters() {
		return
	}
	m := byte(1) << (c % 8)
	if p.bits[c/8]&m != 0 {
		return
	}
	p.bits[c/8] |= m
	p.done++
	p.dirty[int(c/8/progressPage)] = true
}

// Sync makes every mark made before it was called durable. before, if not
// nil, runs
// after the marks are taken and before any is written: the caller syncs
// the origin there, so that no cluster is durably marked restored whose
// restored data is not durable on the origin. A failure leaves the marks
// to the next Sync.
//
// Bits are only ever set, and a page is written whole: a page torn by a
// crash holds, in each sector, either its old bits or its new ones, which
// are a superset, so it still describes clusters that were restored.
func (p *Progress) Sync(before func() error) error {
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	p.mu.Lock()
	pages := make(map[int][]byte, len(p.dirty))
	for pg := range p.dirty {
		lo := pg * progressPage
		pages[pg] = bytes.Clone(p.bits[lo:min(lo+progressPage, len(p.bits))])
	}
	clear(p.dirty)
	p.mu.Unlock()
	var err error
	if before != nil {
		err = before()
	}
	if err == nil {
		for pg, b := range pages {
			if _, err = p.f.WriteAt(b, progressHeaderSize+int64(pg)*progressPage); err != nil {
				err = fmt.Errorf("backstore: rollback progress: write: %w", err)
				break
			}
		}
	}
	if err == nil && len(pages) > 0 {
		if err = p.f.Sync(); err != nil {
			err = fmt.Errorf("backstore: rollback progress: sync: %w", err)
		}
	}
	if err != nil {
		p.mu.Lock()
		for pg := range pages {
			p.dirty[pg] = true
		}
		p.mu.Unlock()
	}
	return err
}

// Close closes the file.
func (p *Progress) Close() error { return p.f.Close() }
