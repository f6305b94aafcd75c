package cow

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The held-writes log keeps the payloads of held writes (held.go) in memory
// shared with a file (MAP_SHARED), which the daemon keeps on tmpfs next to
// its control socket. A held write is answered before it reaches the
// origin; without the log a daemon killed meanwhile would lose it, and a
// client that reconnects (the kernel's nbd client resends only what was in
// flight) would go on as if it were written: a file system then frees
// journal space whose blocks never reached the origin. Before held writes,
// an answered write was in the origin's page cache, which outlives the
// process; the log's pages are page cache too, so an answered write
// survives the process exactly as long as before (not a reboot, which
// loses both, as NBD allows for unflushed writes). The payload is copied
// once, into the log, which is also where the write is issued from: the
// log costs no copy of its own and no system call.
//
// # Format (version 1), little-endian
//
// A header of 4096 bytes, then a ring of records:
//
//	0    8  magic "NBSHELD\x00"
//	8    4  version (1)
//	12   4  tag length (at most 64)
//	16  64  tag: whose log it is (the boot and the origin; ReadHeldLog
//	        ignores a log of another tag)
//	80   8  ring size in bytes (a multiple of 64)
//	88   8  tail: offset in the ring of the oldest live record
//	96   8  head: offset in the ring where the next record goes
//	          (head == tail: empty)
//
// Each record starts on a 64-byte boundary of the ring:
//
//	0   4  state: 0 being written, 1 held (answered), 2 issued (on the
//	       origin), 3 padding: the ring goes on at offset 0
//	4   4  payload length
//	8   8  sequence number: the order in which the writes were answered
//	16  8  origin offset
//	24 40  zero
//	64  …  payload, padded to a multiple of 64
//
// A record whose space left at the end of the ring is under 64 bytes wraps
// to offset 0 without a padding record.
//
// # Why a kill -9 loses nothing answered
//
// A record is written whole, then its state set to held (an atomic store),
// and only then is the write answered; stores to a shared mapping are in the
// page cache the moment they execute, so a killed process leaves every
// answered record complete. The state turns to issued only after the
// origin write returned (the data is then in the origin's page cache), and
// a write overlapping it is issued only after that (issueHeld), so the
// records still held are exactly the answered writes the origin may lack,
// and replaying them in sequence order (over writes that did land) puts
// every range back to its last answered content. Head and tail are stored
// under the log's mutex; a record outside [tail, head) was freed.
const (
	heldLogMagic      = "NBSHELD\x00"
	heldLogVersion    = 1
	heldLogHeaderSize = 4096
	heldRecordHeader  = 64
	heldMaxTag        = 64
)

// Record states.
const (
	heldWriting uint32 = iota
	heldHeld
	heldIssued
	heldPad
)

// HeldLog is the held-writes log: see the format above.
type HeldLog struct {
	f    *os.File
	mem  []byte
	ring []byte // mem after the header

	mu         sync.Mutex
	head, tail int64
	seq        uint64
}

// HeldRecord is a held write that ReadHeldLog found.
type HeldRecord struct {
	Seq  uint64
	Off  int64
	Data []byte
}

// MinHeldLogSize is the smallest log CreateHeldLog accepts.
const MinHeldLogSize = 1 << 20

// CreateHeldLog creates (or truncates) the log at path with a ring of size
// bytes for the owner tag, and maps it. The engine takes it with
// UseHeldLog; the caller closes it after the engine.
func CreateHeldLog(path string, size int64, tag string) (*HeldLog, error) {
	if size < MinHeldLogSize || size%heldRecordHeader != 0 {
		return nil, fmt.Errorf("cow: held-writes log: size %d is not a multiple of 64 of at least %d: %w", size, MinHeldLogSize, ErrBadOption)
	}
	if len(tag) > heldMaxTag {
		return nil, fmt.Errorf("cow: held-writes log: tag longer than %d bytes: %w", heldMaxTag, ErrBadOption)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cow: held-writes log: %w", err)
	}
	// Truncating to 0 first drops the previous records' pages.
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, fmt.Errorf("cow: held-writes log: %w", err)
	}
	if err := f.Truncate(heldLogHeaderSize + size); err != nil {
		f.Close()
		return nil, fmt.Errorf("cow: held-writes log: %w", err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(heldLogHeaderSize+size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cow: held-writes log: map %s: %w", path, err)
	}
	copy(mem, heldLogMagic)
	binary.LittleEndian.PutUint32(mem[8:], heldLogVersion)
	binary.LittleEndian.PutUint32(mem[12:], uint32(len(tag)))
	copy(mem[16:], tag)
	binary.LittleEndian.PutUint64(mem[80:], uint64(size))
	return &HeldLog{f: f, mem: mem, ring: mem[heldLogHeaderSize:]}, nil
}

// Size is the ring's size: the most the held payloads may take.
func (l *HeldLog) Size() int64 { return int64(len(l.ring)) }

// Close unmaps the log and closes its file, which stays for the next
// start. The engine using it must be closed first.
func (l *HeldLog) Close() error {
	err := unix.Munmap(l.mem)
	l.mem, l.ring = nil, nil
	return errors.Join(err, l.f.Close())
}

func (l *HeldLog) state(at int64) *uint32 {
	return (*uint32)(unsafe.Pointer(&l.ring[at]))
}

func recordSize(n int) int64 {
	return heldRecordHeader + (int64(n)+heldRecordHeader-1)/heldRecordHeader*heldRecordHeader
}

// alloc reserves a record for n payload bytes at off and returns its place
// in the ring and its payload, or false if the ring has no room. The
// caller copies the payload and calls publish.
func (l *HeldLog) alloc(n int, off int64) (int64, []byte, bool) {
	need := recordSize(n)
	size := int64(len(l.ring))
	l.mu.Lock()
	defer l.mu.Unlock()
	empty := l.head == l.tail
	if empty {
		l.head, l.tail = 0, 0 // start over
	}
	at := l.head
	switch {
	case l.head >= l.tail && size-l.head < need:
		// No room at the end: wrap, padding the rest of the ring if a
		// record header fits there.
		if empty || need >= l.tail {
			return 0, nil, false
		}
		if size-l.head >= heldRecordHeader {
			clear(l.ring[l.head : l.head+heldRecordHeader])
			atomic.StoreUint32(l.state(l.head), heldPad)
		}
		at = 0
	case l.head < l.tail && l.tail-l.head <= need:
		return 0, nil, false
	}
	head := at + need
	if size-head < heldRecordHeader {
		head = 0
	}
	if head == l.tail {
		return 0, nil, false // a full ring would read as empty
	}
	l.seq++
	r := l.ring[at : at+heldRecordHeader]
	clear(r)
	binary.LittleEndian.PutUint32(r[4:], uint32(n))
	binary.LittleEndian.PutUint64(r[8:], l.seq)
	binary.LittleEndian.PutUint64(r[16:], uint64(off))
	l.head = head
	l.storeEnds()
	return at, l.ring[at+heldRecordHeader : at+heldRecordHeader+int64(n)], true
}

// publish marks the record at at complete: from here on it is answered.
func (l *HeldLog) publish(at int64) { atomic.StoreUint32(l.state(at), heldHeld) }

// issued marks the record at at as on the origin and frees what it can.
func (l *HeldLog) issued(at int64) {
	atomic.StoreUint32(l.state(at), heldIssued)
	l.mu.Lock()
	defer l.mu.Unlock()
	size := int64(len(l.ring))
	for l.tail != l.head {
		switch atomic.LoadUint32(l.state(l.tail)) {
		case heldPad:
			l.tail = 0
			continue
		case heldIssued:
			l.tail += recordSize(int(binary.LittleEndian.Uint32(l.ring[l.tail+4:])))
			if size-l.tail < heldRecordHeader {
				l.tail = 0
			}
			continue
		}
		break
	}
	l.storeEnds()
}

func (l *HeldLog) storeEnds() {
	binary.LittleEndian.PutUint64(l.mem[88:], uint64(l.tail))
	binary.LittleEndian.PutUint64(l.mem[96:], uint64(l.head))
}

// ErrHeldLogDamaged: a held-writes log of the right tag whose records do
// not hold together. It cannot come from a killed process (see the format);
// something else wrote the file.
var ErrHeldLogDamaged = errors.New("held-writes log damaged")

// ErrNotHeldLog: a file that is not empty and not a held-writes log of a
// version this program reads. The owner must not overwrite it: it is not
// ours, or it is a newer program's.
var ErrNotHeldLog = errors.New("not a held-writes log")

// OtherTagError: the log belongs to another owner tag (another boot, whose
// page cache is gone with the writes it had; another origin): its records
// must not be replayed here.
type OtherTagError struct{ Tag string }

func (e *OtherTagError) Error() string {
	return fmt.Sprintf("cow: held-writes log of another boot or origin (tag %q)", e.Tag)
}

// ReadHeldLog returns the held records of the log at path, in sequence
// order: the writes a killed daemon answered and may not have issued. A
// missing or empty file holds none; a log of another tag fails with an
// *OtherTagError, any other file that is not a log with ErrNotHeldLog. The
// records' data is copied out of the file.
func ReadHeldLog(path, tag string) ([]HeldRecord, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cow: held-writes log: %w", err)
	}
	return parseHeldLog(b, tag)
}

// parseHeldLog is ReadHeldLog on the file's bytes.
func parseHeldLog(b []byte, tag string) ([]HeldRecord, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if len(b) < heldLogHeaderSize || !bytes.Equal(b[:8], []byte(heldLogMagic)) ||
		binary.LittleEndian.Uint32(b[8:]) != heldLogVersion {
		return nil, ErrNotHeldLog
	}
	tl := binary.LittleEndian.Uint32(b[12:])
	if tl > heldMaxTag {
		return nil, fmt.Errorf("cow: %w: a tag of %d bytes", ErrHeldLogDamaged, tl)
	}
	if got := string(b[16 : 16+tl]); got != tag {
		return nil, &OtherTagError{Tag: got}
	}
	size := binary.LittleEndian.Uint64(b[80:])
	if size%heldRecordHeader != 0 || size != uint64(len(b)-heldLogHeaderSize) {
		return nil, fmt.Errorf("cow: %w: ring of %d bytes in a file of %d", ErrHeldLogDamaged, size, len(b))
	}
	ring := b[heldLogHeaderSize:]
	tail, head := binary.LittleEndian.Uint64(b[88:]), binary.LittleEndian.Uint64(b[96:])
	if tail%heldRecordHeader != 0 || head%heldRecordHeader != 0 || tail >= max(size, 1) || head >= max(size, 1) {
		return nil, fmt.Errorf("cow: %w: tail %d, head %d", ErrHeldLogDamaged, tail, head)
	}
	var out []HeldRecord
	for at, steps := tail, uint64(0); at != head; steps++ {
		if steps > size/heldRecordHeader {
			return nil, fmt.Errorf("cow: %w: records do not lead from tail to head", ErrHeldLogDamaged)
		}
		r := ring[at:]
		if len(r) < heldRecordHeader {
			return nil, fmt.Errorf("cow: %w: record at %d", ErrHeldLogDamaged, at)
		}
		state := binary.LittleEndian.Uint32(r)
		if state == heldPad {
			at = 0
			continue
		}
		n := uint64(binary.LittleEndian.Uint32(r[4:]))
		rs := uint64(recordSize(int(n)))
		if state > heldPad || rs > uint64(len(r)) {
			return nil, fmt.Errorf("cow: %w: record at %d (state %d, %d bytes)", ErrHeldLogDamaged, at, state, n)
		}
		if state == heldHeld {
			off := binary.LittleEndian.Uint64(r[16:])
			if off > 1<<62 {
				return nil, fmt.Errorf("cow: %w: record at %d writes at %d", ErrHeldLogDamaged, at, off)
			}
			out = append(out, HeldRecord{
				Seq:  binary.LittleEndian.Uint64(r[8:]),
				Off:  int64(off),
				Data: bytes.Clone(r[heldRecordHeader : heldRecordHeader+n]),
			})
		}
		// A record being written was not answered: skipped, as issued
		// ones are.
		at += rs
		if size-at < heldRecordHeader {
			at = 0
		}
	}
	slices.SortFunc(out, func(a, b HeldRecord) int { return cmp.Compare(a.Seq, b.Seq) })
	return out, nil
}
