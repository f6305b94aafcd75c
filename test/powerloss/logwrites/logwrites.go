package logwrites

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"strings"
)

// Constants of the on-disk format; see the package documentation.
const (
	logMagic   = 0x6a736677736872
	logVersion = 1

	superLen  = 28 // magic, version, nr_entries, sectorsize
	headerLen = 32 // struct log_write_entry

	minSectorSize = 512
	// The kernel's sector size is the data device's logical block size,
	// which is at most 64 KiB on any configuration Linux supports.
	maxSectorSize = 64 << 10
)

// Flags are the flags of a log entry, as the kernel records them.
type Flags uint64

// The flags of an entry. An entry with neither Discard nor Mark set is a
// write; with Flush set and a zero Length it is a bare flush.
const (
	Flush    Flags = 1 << 0 // REQ_PREFLUSH: a cache flush preceded the write
	FUA      Flags = 1 << 1 // REQ_FUA: the write bypassed the device cache
	Discard  Flags = 1 << 2 // REQ_OP_DISCARD
	Mark     Flags = 1 << 3 // a mark set with "dmsetup message ... mark TEXT"
	Metadata Flags = 1 << 4 // REQ_META: the file system flagged the write as metadata

	knownFlags = Flush | FUA | Discard | Mark | Metadata
)

// String returns the flags as names joined by "|", such as "write|fua",
// "flush", "discard" or "mark". A write, which has no flag of its own, is
// named "write" unless Flush names it; unknown bits are printed in hex.
func (f Flags) String() string {
	names := [...]struct {
		flag Flags
		name string
	}{
		{Flush, "flush"},
		{FUA, "fua"},
		{Discard, "discard"},
		{Mark, "mark"},
		{Metadata, "metadata"},
	}
	var parts []string
	if f&(Flush|Discard|Mark) == 0 {
		parts = append(parts, "write")
	}
	for _, n := range names {
		if f&n.flag != 0 {
			parts = append(parts, n.name)
		}
	}
	if unknown := f &^ knownFlags; unknown != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint64(unknown)))
	}
	return strings.Join(parts, "|")
}

// An Entry is one entry of the log.
type Entry struct {
	Index  int   // 0-based position in the log
	Offset int64 // byte offset on the data device
	Length int64 // bytes written or discarded (0 for a bare flush or a mark)
	Flags  Flags
	Mark   string // the mark's text, for Mark entries

	logOffset  int64 // byte offset of the entry's header block in the log
	dataOffset int64 // byte offset of a write's data in the log
}

// hasData reports whether the log holds data for e: discards, marks and
// bare flushes have none.
func (e Entry) hasData() bool {
	return e.Flags&Discard == 0 && e.Length > 0
}

// String describes the entry, such as `write|fua 4096 bytes at 8192` or
// `mark "sync"`.
func (e Entry) String() string {
	switch {
	case e.Flags&Mark != 0:
		return fmt.Sprintf("%s %q", e.Flags, e.Mark)
	case e.Length == 0:
		return e.Flags.String()
	default:
		return fmt.Sprintf("%s %d bytes at %d", e.Flags, e.Length, e.Offset)
	}
}

// A FormatError reports a log that does not follow the on-disk format:
// what is wrong, and where.
type FormatError struct {
	Entry  int   // index of the entry, or -1 for the super block
	Offset int64 // byte offset in the log of the entry's header block (0 for the super block)
	Msg    string
}

func (e *FormatError) Error() string {
	if e.Entry < 0 {
		return "logwrites: super block: " + e.Msg
	}
	return fmt.Sprintf("logwrites: entry %d at log offset %d: %s", e.Entry, e.Offset, e.Msg)
}

// A Log is a dm-log-writes log: its entries' headers, held in memory, and
// the reader their data is read from on demand.
type Log struct {
	SectorSize int     // the data device's sector size, in bytes
	Entries    []Entry // Entries[i].Index == i

	r    io.ReaderAt
	size int64
}

// Open reads the super block of the log in r, which is size bytes long, and
// walks all its entries, reading their headers only: the data stays in r
// and is read by ReadData and the Replayer. A log that does not follow the
// format gives a *FormatError; a failing read gives the reader's error,
// wrapped.
func Open(r io.ReaderAt, size int64) (*Log, error) {
	superErr := func(format string, args ...any) error {
		return &FormatError{Entry: -1, Offset: 0, Msg: fmt.Sprintf(format, args...)}
	}
	if size < superLen {
		return nil, superErr("log is %d bytes, too short for a super block", size)
	}
	var sb [superLen]byte
	if err := readFull(r, sb[:], 0); err != nil {
		return nil, fmt.Errorf("logwrites: reading super block: %w", err)
	}
	if m := binary.LittleEndian.Uint64(sb[0:]); m != logMagic {
		return nil, superErr("bad magic %#x, want %#x", m, uint64(logMagic))
	}
	if v := binary.LittleEndian.Uint64(sb[8:]); v != logVersion {
		return nil, superErr("unknown version %d, want %d", v, logVersion)
	}
	nr := binary.LittleEndian.Uint64(sb[16:])
	ss := binary.LittleEndian.Uint32(sb[24:])
	if ss < minSectorSize || ss > maxSectorSize || ss&(ss-1) != 0 {
		return nil, superErr("bad sector size %d: want a power of two from %d to %d",
			ss, minSectorSize, maxSectorSize)
	}
	if size < int64(ss) {
		return nil, superErr("log is %d bytes, shorter than its super block (%d bytes)", size, ss)
	}
	// Every entry takes at least its header block, so the log's size bounds
	// nr_entries, and with it everything allocated below.
	if blocks := uint64(size/int64(ss)) - 1; nr > blocks || nr > math.MaxInt {
		return nil, superErr("nr_entries %d is more than the %d blocks after the super block hold",
			nr, blocks)
	}

	l := &Log{SectorSize: int(ss), r: r, size: size}
	l.Entries = make([]Entry, 0, min(nr, 4096))
	block := make([]byte, ss)
	pos := int64(ss)
	for i := range int(nr) {
		e, next, err := l.readEntry(i, pos, block)
		if err != nil {
			return nil, err
		}
		l.Entries = append(l.Entries, e)
		pos = next
	}
	return l, nil
}

// readEntry reads and checks entry i, whose header block starts at pos, using
// block (SectorSize bytes) as a buffer. It returns the entry and the offset
// of the next entry's header block.
func (l *Log) readEntry(i int, pos int64, block []byte) (Entry, int64, error) {
	fail := func(format string, args ...any) (Entry, int64, error) {
		return Entry{}, 0, &FormatError{Entry: i, Offset: pos, Msg: fmt.Sprintf(format, args...)}
	}
	ss := int64(l.SectorSize)
	if left := l.size - pos; left < ss {
		return fail("header block truncated: the log ends %d bytes into its %d", left, ss)
	}
	if err := readFull(l.r, block, pos); err != nil {
		return Entry{}, 0, fmt.Errorf("logwrites: entry %d at log offset %d: reading header: %w",
			i, pos, err)
	}
	sector := binary.LittleEndian.Uint64(block[0:])
	nrSectors := binary.LittleEndian.Uint64(block[8:])
	flags := Flags(binary.LittleEndian.Uint64(block[16:]))
	dataLen := binary.LittleEndian.Uint64(block[24:])

	if unknown := flags &^ knownFlags; unknown != 0 {
		return fail("unknown flags %#x", uint64(unknown))
	}
	if flags == 0 && nrSectors == 0 {
		// The kernel never logs a write of nothing; this is most likely a
		// zeroed block that nr_entries counts but the kernel never wrote.
		return fail("write of 0 sectors (a zeroed block?)")
	}
	textEnd := uint64(headerLen)
	if flags&Mark != 0 {
		if flags != Mark {
			return fail("mark with other flags (%s)", flags)
		}
		if nrSectors != 0 {
			return fail("mark with nr_sectors %d", nrSectors)
		}
		if dataLen > uint64(ss-headerLen) {
			return fail("mark text of %d bytes does not fit in its %d-byte block", dataLen, ss)
		}
		textEnd += dataLen
	} else if dataLen != 0 {
		return fail("data_len %d on a %s entry: only marks have data_len", dataLen, flags)
	}
	// The kernel zeroes the rest of the header block; anything else there
	// means this is not a header block, e.g. the log is out of step.
	for j := textEnd; j < uint64(ss); j++ {
		if block[j] != 0 {
			return fail("non-zero byte %#x at %d in the header block's padding", block[j], j)
		}
	}

	limit := uint64(math.MaxInt64) / uint64(ss)
	if sector > limit || nrSectors > limit {
		return fail("sector %d or nr_sectors %d too large", sector, nrSectors)
	}
	e := Entry{
		Index:     i,
		Offset:    int64(sector) * ss,
		Length:    int64(nrSectors) * ss,
		Flags:     flags,
		logOffset: pos,
	}
	if e.Offset > math.MaxInt64-e.Length {
		return fail("range of %d bytes at %d overflows", e.Length, e.Offset)
	}
	if flags&Mark != 0 {
		e.Mark = string(block[headerLen:textEnd])
	}
	next := pos + ss
	if e.hasData() {
		if left := l.size - next; e.Length > left {
			return fail("data of %d bytes runs past the end of the log (%d bytes left)",
				e.Length, left)
		}
		e.dataOffset = next
		next += e.Length
	}
	return e, next, nil
}

// ReadData reads the data of the write e into p, which must be e.Length bytes
// long. Entries without data in the log (bare flushes and marks, whose
// Length is 0) read nothing; discards, which have a Length but no data, give
// an error. e must be one of l.Entries.
func (l *Log) ReadData(e Entry, p []byte) error {
	if e.Index < 0 || e.Index >= len(l.Entries) || l.Entries[e.Index] != e {
		return fmt.Errorf("logwrites: entry %d (%s) is not an entry of this log", e.Index, e)
	}
	if e.Flags&Discard != 0 {
		return fmt.Errorf("logwrites: entry %d (%s) is a discard and has no data", e.Index, e)
	}
	if int64(len(p)) != e.Length {
		return fmt.Errorf("logwrites: entry %d (%s): buffer is %d bytes, want %d",
			e.Index, e, len(p), e.Length)
	}
	if len(p) == 0 {
		return nil
	}
	if err := readFull(l.r, p, e.dataOffset); err != nil {
		return fmt.Errorf("logwrites: entry %d at log offset %d: reading %d bytes of data: %w",
			e.Index, e.logOffset, len(p), err)
	}
	return nil
}

// FindMark returns the index of the first mark entry whose text is text, or
// -1 if there is none.
func (l *Log) FindMark(text string) int {
	for _, e := range l.Entries {
		if e.Flags&Mark != 0 && e.Mark == text {
			return e.Index
		}
	}
	return -1
}

// readFull reads len(p) bytes at off. io.ReaderAt may return io.EOF along
// with a full read at the end of its data; that is success here, while a
// short read, with or without io.EOF, is io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}
