// Package workload is what the power-loss test's guest and host share: the
// recording's specification, the record of what the guest's workload did
// (which the host turns into what must hold after a crash at any point of
// the log), and the content of the blocks the random-write workload writes.
//
// The guest runs a workload on /dev/nbd0 through the kernel's NBD client while
// dm-log-writes records every write, FLUSH and FUA that reaches the disk
// holding the origin, the backing stores and the daemon's state. The
// workload cannot see that log; what links the two are marks: after each
// event whose outcome the test checks (an fsync returned, a FUA write
// returned, a create or a clear returned) the guest adds a dm-log-writes mark
// named after it (Event.Mark). A mark lands in the log after every write
// completed before it, so a crash at any log entry after the mark must
// preserve what the event promised.
package workload

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
)

// BlockSize is the unit of the random-write workload: every write covers
// whole blocks, and every block written carries its own identity.
const BlockSize = 4096

// Layouts: where the origin, the backing stores and the state directory
// live on the recorded disk.
const (
	// LayoutRaw splits the disk with dm-linear: the origin and each backing
	// store are raw block devices; the state directory is on a small ext4.
	LayoutRaw = "raw"
	// LayoutFile makes one ext4 of the disk holding origin.img, the backing
	// store files and the state directory.
	LayoutFile = "file"
)

// Workloads run on the origin's NBD device.
const (
	// Random writes blocks with identities (see Block) from several
	// writers, with fsyncs and FUA writes among them.
	Random = "random"
	// Ext4 makes ext4 on the origin and writes, deletes and syncs files.
	Ext4 = "ext4"
)

// Spec is one recording, chosen by the host and read by the guest.
type Spec struct {
	Index       int    `json:"index"`        // names the VM's disks: nbdsnap-pl-INDEX-{data,log,record}
	Root        string `json:"root"`         // a directory path unique to the recording, the same in guest and host
	Layout      string `json:"layout"`       // LayoutRaw or LayoutFile
	Workload    string `json:"workload"`     // Random or Ext4
	ClusterSize string `json:"cluster_size"` // nbdsnap create --cluster-size
	Seed        uint64 `json:"seed"`         // of the workload's random choices
	OriginSize  int64  `json:"origin_size"`  // bytes
}

// Name identifies a recording in logs and test names, e.g. "raw-4K-random".
func (s Spec) Name() string {
	return s.Layout + "-" + s.ClusterSize + "-" + s.Workload
}

// Event kinds, in the order the guest saw them happen.
const (
	KindWrite   = "write"   // a write was issued: Seq, Block, Count, FUA
	KindDone    = "done"    // write Seq was acknowledged (FUA writes carry a Mark)
	KindSync    = "sync"    // fsync (Random) or sync (Ext4) number ID was called; Files for Ext4
	KindSynced  = "synced"  // it returned; Mark
	KindCreate  = "create"  // snapshot Name is about to be created; Hash of the origin at its instant; Mark
	KindCreated = "created" // the create returned; Mark
	KindClear   = "clear"   // snapshot Name is about to be cleared; Mark
	KindCleared = "cleared" // the clear returned; Mark
	KindDelete  = "delete"  // Ext4: file Path was unlinked (before a later sync makes it durable)
)

// Event is one thing the workload did. Fields not used by a kind are zero.
type Event struct {
	Kind  string            `json:"kind"`
	Seq   int64             `json:"seq,omitempty"`
	Block int64             `json:"block,omitempty"`
	Count int64             `json:"count,omitempty"`
	FUA   bool              `json:"fua,omitempty"`
	ID    int               `json:"id,omitempty"`
	Name  string            `json:"name,omitempty"`
	Hash  string            `json:"hash,omitempty"`
	Path  string            `json:"path,omitempty"`
	Files map[string]string `json:"files,omitempty"` // path -> sha256 of its content
	Mark  string            `json:"mark,omitempty"`  // the dm-log-writes mark added right after the event
}

// Record is what the guest hands back: its spec, what it did, and the
// backing path of each snapshot.
type Record struct {
	Spec    Spec              `json:"spec"`
	Events  []Event           `json:"events"`
	Backing map[string]string `json:"backing"` // snapshot name -> backing path
	Origin  string            `json:"origin"`  // the origin's path as served
	State   string            `json:"state"`   // the state directory
	Error   string            `json:"error,omitempty"`
}

// FirstMark is the mark the guest adds once the daemon serves the origin;
// crash points before it are not checked (there is no state to start from).
const FirstMark = "served"

// Block fills b (BlockSize bytes) with the content write seq puts at block
// index block: a header naming both, then bytes drawn from them, so that a
// block's content says which write it came from and a torn or misplaced
// block is told apart from any real one.
func Block(b []byte, seed uint64, block, seq int64) {
	copy(b, blockMagic)
	binary.LittleEndian.PutUint64(b[8:], uint64(block))
	binary.LittleEndian.PutUint64(b[16:], uint64(seq))
	binary.LittleEndian.PutUint64(b[24:], seed)
	r := rand.New(rand.NewPCG(seed^uint64(block)<<20, uint64(seq)))
	for i := 32; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
}

const blockMagic = "NBDSPLW1"

// ErrForeign says a block holds neither zeros nor any write's content.
var ErrForeign = errors.New("content no write of the workload put there")

// Decode tells which write a block's content came from: seq 0 for an
// all-zero block (never written), else the write's seq. A block that is
// neither is ErrForeign.
func Decode(b []byte, seed uint64, block int64) (int64, error) {
	if string(b[:8]) != blockMagic {
		for _, c := range b {
			if c != 0 {
				return 0, fmt.Errorf("block %d: %w (no header)", block, ErrForeign)
			}
		}
		return 0, nil
	}
	seq := int64(binary.LittleEndian.Uint64(b[16:]))
	want := make([]byte, len(b))
	Block(want, seed, block, seq)
	if string(want) != string(b) {
		return 0, fmt.Errorf("block %d: %w (header says write %d)", block, ErrForeign, seq)
	}
	return seq, nil
}

// HashBytes is the digest the record uses for images and files.
func HashBytes(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Writes indexes a Random record's writes by block: which seqs wrote each
// block, ascending.
func (r *Record) Writes() map[int64][]int64 {
	w := map[int64][]int64{}
	for _, e := range r.Events {
		if e.Kind != KindWrite {
			continue
		}
		for b := e.Block; b < e.Block+e.Count; b++ {
			w[b] = append(w[b], e.Seq)
		}
	}
	for _, s := range w {
		slices.Sort(s)
	}
	return w
}

// Required returns, for a crash right after the log's marks in passed
// (mark text -> true for every mark before the crash point), the oldest
// write each block may hold: the last write to it acknowledged before an
// fsync that returned (and was marked) before the crash, or a FUA write
// acknowledged (and marked) before it. A block absent from the map may
// still be all zeros.
//
// Each writer owns its blocks and writes them one at a time, so a block's
// writes are acknowledged in seq order, and "holds seq >= required" means
// "holds the required write or one issued after it".
func (r *Record) Required(passed map[string]bool) map[int64]int64 {
	acked := map[int64]int64{}          // block -> last acknowledged seq
	atSync := map[int]map[int64]int64{} // sync ID -> acked when it was called
	writes := map[int64]Event{}
	req := map[int64]int64{}
	raise := func(block, seq int64) {
		if seq > req[block] {
			req[block] = seq
		}
	}
	for _, e := range r.Events {
		switch e.Kind {
		case KindWrite:
			writes[e.Seq] = e
		case KindDone:
			w := writes[e.Seq]
			for b := w.Block; b < w.Block+w.Count; b++ {
				acked[b] = max(acked[b], e.Seq)
			}
			if w.FUA && passed[e.Mark] {
				for b := w.Block; b < w.Block+w.Count; b++ {
					raise(b, e.Seq)
				}
			}
		case KindSync:
			atSync[e.ID] = maps.Clone(acked)
		case KindSynced:
			if passed[e.Mark] {
				for b, seq := range atSync[e.ID] {
					raise(b, seq)
				}
			}
		}
	}
	return req
}

// SnapshotExpect is what a crash point promises about one snapshot.
type SnapshotExpect struct {
	Name    string
	Hash    string // of the origin at its create instant
	Backing string
	// Must: the create returned and no clear began before the crash
	// point: the snapshot must be listed, valid and equal to Hash.
	Must bool
	// Gone: a clear returned before the crash point: it must not be
	// listed.
	Gone bool
}

// Snapshots returns what the marks in passed promise about each snapshot
// the workload created. A snapshot neither Must nor Gone (a crash during
// its create or its clear) may be listed or not; listed valid, it must
// still equal Hash.
func (r *Record) Snapshots(passed map[string]bool) []SnapshotExpect {
	var out []SnapshotExpect
	idx := map[string]int{}
	for _, e := range r.Events {
		switch e.Kind {
		case KindCreate:
			idx[e.Name] = len(out)
			out = append(out, SnapshotExpect{Name: e.Name, Hash: e.Hash, Backing: r.Backing[e.Name]})
		case KindCreated:
			if passed[e.Mark] {
				out[idx[e.Name]].Must = true
			}
		case KindClear:
			if passed[e.Mark] {
				out[idx[e.Name]].Must = false
			}
		case KindCleared:
			if passed[e.Mark] {
				out[idx[e.Name]].Gone = true
			}
		}
	}
	return out
}

// FileExpect is what a crash point promises about one Ext4 file.
type FileExpect struct {
	Path string
	Hash string
	// MayBeGone: deleted after the sync that made it durable; it is
	// either intact or absent.
	MayBeGone bool
}

// Files returns the files the last sync marked before the crash point
// made durable, with their content; files deleted since may be gone.
func (r *Record) Files(passed map[string]bool) []FileExpect {
	files := map[int]map[string]string{}
	var last map[string]string
	lastAt := -1
	for i, e := range r.Events {
		switch e.Kind {
		case KindSync:
			files[e.ID] = e.Files
		case KindSynced:
			if passed[e.Mark] {
				last, lastAt = files[e.ID], i
			}
		}
	}
	deleted := map[string]bool{}
	for _, e := range r.Events[lastAt+1:] {
		if e.Kind == KindDelete {
			deleted[e.Path] = true
		}
	}
	var out []FileExpect
	for p, h := range last {
		out = append(out, FileExpect{Path: p, Hash: h, MayBeGone: deleted[p]})
	}
	slices.SortFunc(out, func(a, b FileExpect) int { return strings.Compare(a.Path, b.Path) })
	return out
}

// The record disk: the host writes the spec at SpecOffset, the guest its
// record at RecordOffset, each a document in the form WriteDoc writes.
const (
	SpecOffset   = 0
	RecordOffset = 1 << 20
	maxDoc       = 64 << 20
)

// WriteDoc writes b at off, preceded by its length (8 bytes, little
// endian).
func WriteDoc(w io.WriterAt, off int64, b []byte) error {
	buf := binary.LittleEndian.AppendUint64(nil, uint64(len(b)))
	_, err := w.WriteAt(append(buf, b...), off)
	return err
}

// ReadDoc reads the document WriteDoc wrote at off.
func ReadDoc(r io.ReaderAt, off int64) ([]byte, error) {
	var n [8]byte
	if _, err := r.ReadAt(n[:], off); err != nil {
		return nil, fmt.Errorf("document at %d: %w", off, err)
	}
	size := binary.LittleEndian.Uint64(n[:])
	if size == 0 || size > maxDoc {
		return nil, fmt.Errorf("no document at %d (length %d)", off, size)
	}
	b := make([]byte, size)
	if _, err := r.ReadAt(b, off+8); err != nil {
		return nil, fmt.Errorf("document at %d: %w", off, err)
	}
	return b, nil
}

// Region is a part of the raw layout's disk.
type Region struct {
	Name         string // "origin", a snapshot's name, or "state"
	Offset, Size int64
}

// RawRegions splits the raw layout's disk: the origin, one backing store
// per snapshot (each big enough for a full copy of the origin and its
// map), and a small ext4 for the state directory.
func RawRegions(originSize int64) []Region {
	sizes := []Region{{"origin", 0, originSize}, {"snap1", 0, originSize + 8<<20},
		{"snap2", 0, originSize + 8<<20}, {"state", 0, 16 << 20}}
	var off int64
	for i := range sizes {
		sizes[i].Offset = off
		off += sizes[i].Size
	}
	return sizes
}
