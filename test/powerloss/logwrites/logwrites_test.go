package logwrites_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/test/powerloss/logwrites"
)

// The test writer below produces logs in the kernel's layout on its own,
// from the constants and layout of drivers/md/dm-log-writes.c, so that a
// mistake in the package's reading of the format does not cancel out.

const (
	testMagic   = 0x6a736677736872
	testVersion = 1
	mib         = 1 << 20
)

// An op is one operation recorded in a log. Its kind follows from flags: a
// mark if Mark is set, a discard if Discard is set, a write otherwise (a bare
// flush when data is empty).
type op struct {
	flags logwrites.Flags
	off   int64  // byte offset on the device, a multiple of the sector size
	data  []byte // a write's data, a multiple of the sector size
	n     int64  // a discard's length in bytes, a multiple of the sector size
	text  string // a mark's text
}

func (o op) String() string {
	switch {
	case o.flags&logwrites.Mark != 0:
		return fmt.Sprintf("mark %q", o.text)
	case o.flags&logwrites.Discard != 0:
		return fmt.Sprintf("discard %d@%d", o.n, o.off)
	default:
		return fmt.Sprintf("%s %d@%d", o.flags, len(o.data), o.off)
	}
}

// buildLog returns a log with sector size ss recording ops, laid out as the
// kernel lays it out: a super block in block 0, then for each op a header
// block (with a mark's text after the header) followed by a write's data.
func buildLog(ss int, ops []op) []byte {
	le := binary.LittleEndian
	super := make([]byte, ss)
	le.PutUint64(super[0:], testMagic)
	le.PutUint64(super[8:], testVersion)
	le.PutUint64(super[16:], uint64(len(ops)))
	le.PutUint32(super[24:], uint32(ss))
	// The kernel writes the super block from a struct on its stack, whose
	// 4 bytes of tail padding are never initialised.
	copy(super[28:32], []byte{0xde, 0xad, 0xbe, 0xef})
	log := super
	for _, o := range ops {
		hdr := make([]byte, ss)
		var nrSectors int64
		switch {
		case o.flags&logwrites.Mark != 0:
			le.PutUint64(hdr[24:], uint64(len(o.text)))
			copy(hdr[32:], o.text)
		case o.flags&logwrites.Discard != 0:
			nrSectors = o.n / int64(ss)
		default:
			nrSectors = int64(len(o.data) / ss)
		}
		le.PutUint64(hdr[0:], uint64(o.off/int64(ss)))
		le.PutUint64(hdr[8:], uint64(nrSectors))
		le.PutUint64(hdr[16:], uint64(o.flags))
		log = append(log, hdr...)
		if o.flags&(logwrites.Mark|logwrites.Discard) == 0 {
			log = append(log, o.data...)
		}
	}
	return log
}

// applyOp applies o to the reference image img directly.
func applyOp(img []byte, o op) {
	switch {
	case o.flags&logwrites.Mark != 0:
	case o.flags&logwrites.Discard != 0:
		clear(img[o.off : o.off+o.n])
	default:
		copy(img[o.off:], o.data)
	}
}

// memDev is an in-memory device of fixed size whose WriteAt fails past its
// end, as a block device does. It records the largest write it saw.
type memDev struct {
	b        []byte
	maxWrite int
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(d.b)) || int64(len(p)) > int64(len(d.b))-off {
		return 0, fmt.Errorf("write of %d bytes at %d past the end of a %d-byte device",
			len(p), off, len(d.b))
	}
	d.maxWrite = max(d.maxWrite, len(p))
	return copy(d.b[off:], p), nil
}

// countingReader records the largest read it saw.
type countingReader struct {
	r       io.ReaderAt
	maxRead int
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.maxRead = max(c.maxRead, len(p))
	return c.r.ReadAt(p, off)
}

// pattern returns n bytes of data that differ from op to op.
func pattern(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 0x6c6f67))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// checkEntries checks that the log's entries describe ops.
func checkEntries(t *testing.T, l *logwrites.Log, ops []op, ss int) {
	t.Helper()
	if l.SectorSize != ss {
		t.Fatalf("SectorSize = %d, want %d", l.SectorSize, ss)
	}
	if len(l.Entries) != len(ops) {
		t.Fatalf("%d entries, want %d", len(l.Entries), len(ops))
	}
	for i, o := range ops {
		e := l.Entries[i]
		var wantLen int64
		switch {
		case o.flags&logwrites.Mark != 0:
		case o.flags&logwrites.Discard != 0:
			wantLen = o.n
		default:
			wantLen = int64(len(o.data))
		}
		wantOff := o.off
		if e.Index != i || e.Offset != wantOff || e.Length != wantLen || e.Flags != o.flags ||
			e.Mark != o.text {
			t.Fatalf("entry %d = {Index %d Offset %d Length %d Flags %s Mark %q}, want %v",
				i, e.Index, e.Offset, e.Length, e.Flags, e.Mark, o)
		}
		if o.flags&(logwrites.Mark|logwrites.Discard) != 0 {
			continue
		}
		got := make([]byte, e.Length)
		if err := l.ReadData(e, got); err != nil {
			t.Fatalf("ReadData(entry %d): %v", i, err)
		}
		if !bytes.Equal(got, o.data) {
			t.Fatalf("ReadData(entry %d) returned other data than was written", i)
		}
	}
}

// firstDiff describes where two images differ.
func firstDiff(got, want []byte) string {
	for i := range want {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d: got %#x, want %#x", i, got[i], want[i])
		}
	}
	return "no difference"
}

func TestLogs(t *testing.T) {
	// Ops are given in units of sectors and materialised for each sector
	// size, so that every case runs at 512 and at 4096.
	type spec struct {
		flags logwrites.Flags
		sec   int64 // first sector
		nsec  int64 // sectors written or discarded
		text  string
	}
	const devSectors = 1024 // 512 KiB at 512, 4 MiB at 4096
	tests := []struct {
		name string
		ops  []spec
	}{
		{"empty", nil},
		{"one write", []spec{{sec: 0, nsec: 1}}},
		{"writes of various sizes and offsets", []spec{
			{sec: 3, nsec: 1},
			{sec: 100, nsec: 17},
			{sec: devSectors - 1, nsec: 1},
			{sec: 90, nsec: 20}, // overlaps the second write
			{sec: 0, nsec: 64},
		}},
		{"flushes and fua", []spec{
			{sec: 8, nsec: 2},
			{flags: logwrites.Flush},
			{flags: logwrites.FUA, sec: 9, nsec: 4},
			{flags: logwrites.Flush | logwrites.FUA, sec: 0, nsec: 1},
			{flags: logwrites.FUA | logwrites.Metadata, sec: 512, nsec: 3},
			{flags: logwrites.Flush},
		}},
		{"discards", []spec{
			{sec: 0, nsec: 64},
			{flags: logwrites.Discard, sec: 10, nsec: 20},
			{sec: 15, nsec: 2},
			{flags: logwrites.Discard, sec: 0, nsec: devSectors},
			{sec: 63, nsec: 1},
		}},
		{"marks", []spec{
			{flags: logwrites.Mark, text: "start"},
			{sec: 4, nsec: 4},
			{flags: logwrites.Mark, text: ""},
			{flags: logwrites.Mark, text: strings.Repeat("x", 512-33)}, // the kernel's longest at 512
			{flags: logwrites.Flush},
			{flags: logwrites.Mark, text: "dm-log-writes-end"},
		}},
	}
	for _, ss := range []int{512, 4096} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("%s/%d", tt.name, ss), func(t *testing.T) {
				var ops []op
				for i, s := range tt.ops {
					o := op{flags: s.flags, off: s.sec * int64(ss), text: s.text}
					switch {
					case s.flags&logwrites.Mark != 0:
						o.off = 0
					case s.flags&logwrites.Discard != 0:
						o.n = s.nsec * int64(ss)
					default:
						o.data = pattern(uint64(i), int(s.nsec)*ss)
					}
					ops = append(ops, o)
				}
				testReplay(t, ss, devSectors*int64(ss), ops)
			})
		}
	}
}

// testReplay builds a log of ops, opens it, checks its entries, and replays
// it forward one entry at a time, comparing the image after every entry with
// a reference image computed from ops.
func testReplay(t *testing.T, ss int, devSize int64, ops []op) {
	t.Helper()
	b := buildLog(ss, ops)
	l := mustOpen(t, b)
	checkEntries(t, l, ops, ss)

	want := make([]byte, devSize)
	dev := &memDev{b: make([]byte, devSize)}
	r := logwrites.NewReplayer(l, dev)
	for i, o := range ops {
		applyOp(want, o)
		if err := r.ApplyThrough(i); err != nil {
			t.Fatalf("ApplyThrough(%d): %v", i, err)
		}
		if r.Next() != i+1 {
			t.Fatalf("after ApplyThrough(%d), Next() = %d", i, r.Next())
		}
		if !bytes.Equal(dev.b, want) {
			t.Fatalf("after entry %d (%v): image differs from reference: %s",
				i, o, firstDiff(dev.b, want))
		}
	}
	for i, o := range ops {
		if o.flags&logwrites.Mark == 0 {
			continue
		}
		if got := l.FindMark(o.text); got > i || got < 0 || l.Entries[got].Mark != o.text {
			t.Errorf("FindMark(%q) = %d, want the first mark with that text, at or before %d",
				o.text, got, i)
		}
	}
	if got := l.FindMark("no such mark"); got != -1 {
		t.Errorf("FindMark of a missing mark = %d, want -1", got)
	}
}

// TestLargeEntries replays entries larger than the Replayer's 1 MiB chunk and
// checks that memory stays bounded: no read from the log and no write to the
// device is larger than 1 MiB.
func TestLargeEntries(t *testing.T) {
	const ss = 4096
	const devSize = 8 * mib
	ops := []op{
		{off: ss, data: pattern(1, 3*mib+ss)},
		{flags: logwrites.FUA, off: 5 * mib, data: pattern(2, 2*mib)},
		{flags: logwrites.Discard, off: ss * 7, n: 5*mib/2 + ss},
		{flags: logwrites.Discard, off: 0, n: devSize},
		{off: 2 * mib, data: pattern(3, mib)},
	}
	b := buildLog(ss, ops)
	cr := &countingReader{r: bytes.NewReader(b)}
	l, err := logwrites.Open(cr, int64(len(b)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if cr.maxRead > ss {
		t.Errorf("Open read %d bytes at once, want at most a block (%d)", cr.maxRead, ss)
	}
	want := make([]byte, devSize)
	dev := &memDev{b: make([]byte, devSize)}
	r := logwrites.NewReplayer(l, dev)
	for i, o := range ops {
		applyOp(want, o)
		if err := r.ApplyThrough(i); err != nil {
			t.Fatalf("ApplyThrough(%d): %v", i, err)
		}
		if !bytes.Equal(dev.b, want) {
			t.Fatalf("after entry %d (%v): %s", i, o, firstDiff(dev.b, want))
		}
	}
	if cr.maxRead > mib || dev.maxWrite > mib {
		t.Errorf("largest read %d bytes, largest write %d bytes, want at most %d",
			cr.maxRead, dev.maxWrite, mib)
	}
}

// testSeed returns the seed for randomised tests: LOGWRITES_SEED if set, so
// that a failure can be replayed, or else the clock.
func testSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv("LOGWRITES_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("LOGWRITES_SEED=%q: %v", s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

// randomOps returns n random operations on a device of devSectors sectors.
func randomOps(rng *rand.Rand, ss int, devSectors int64, n int) []op {
	var ops []op
	for i := range n {
		var o op
		switch k := rng.IntN(100); {
		case k < 55: // write
			sec := rng.Int64N(devSectors)
			nsec := 1 + rng.Int64N(min(32, devSectors-sec))
			o.off = sec * int64(ss)
			o.data = pattern(rng.Uint64()^uint64(i), int(nsec)*ss)
			if rng.IntN(4) == 0 {
				o.flags |= logwrites.FUA
			}
			if rng.IntN(8) == 0 {
				o.flags |= logwrites.Flush
			}
			if rng.IntN(4) == 0 {
				o.flags |= logwrites.Metadata
			}
		case k < 70: // bare flush, possibly with FUA
			o.flags = logwrites.Flush
			if rng.IntN(4) == 0 {
				o.flags |= logwrites.FUA
			}
		case k < 85: // discard
			sec := rng.Int64N(devSectors)
			o.flags = logwrites.Discard
			o.off = sec * int64(ss)
			o.n = (1 + rng.Int64N(devSectors-sec)) * int64(ss)
		default: // mark, its text up to the longest the kernel writes
			o.flags = logwrites.Mark
			text := make([]byte, rng.IntN(ss-33+1))
			for j := range text {
				text[j] = byte('a' + rng.IntN(26))
			}
			o.text = string(text)
		}
		ops = append(ops, o)
	}
	return ops
}

// TestModel replays random logs at every prefix and compares each image with
// a reference image computed from the operations. Set LOGWRITES_SEED to the
// seed it logs to replay a failure.
func TestModel(t *testing.T) {
	seed := testSeed(t)
	t.Logf("seed %d (rerun with LOGWRITES_SEED=%d)", seed, seed)
	for _, ss := range []int{512, 4096} {
		t.Run(strconv.Itoa(ss), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, uint64(ss)))
			const devSectors = 256
			devSize := int64(devSectors * ss)
			ops := randomOps(rng, ss, devSectors, 300)
			b := buildLog(ss, ops)
			l, err := logwrites.Open(bytes.NewReader(b), int64(len(b)))
			if err != nil {
				t.Fatalf("seed %d: Open: %v", seed, err)
			}
			if len(l.Entries) != len(ops) {
				t.Fatalf("seed %d: %d entries, want %d", seed, len(l.Entries), len(ops))
			}

			// images[k] is the device after ops[0..k-1].
			images := make([][]byte, len(ops)+1)
			images[0] = make([]byte, devSize)
			for i, o := range ops {
				images[i+1] = bytes.Clone(images[i])
				applyOp(images[i+1], o)
			}

			// Every prefix, one entry at a time.
			dev := &memDev{b: make([]byte, devSize)}
			r := logwrites.NewReplayer(l, dev)
			for i := range ops {
				if err := r.ApplyThrough(i); err != nil {
					t.Fatalf("seed %d: ApplyThrough(%d): %v", seed, i, err)
				}
				if !bytes.Equal(dev.b, images[i+1]) {
					t.Fatalf("seed %d: after entry %d (%v): %s",
						seed, i, ops[i], firstDiff(dev.b, images[i+1]))
				}
			}

			// Forward in random strides, as a test checking at marks does.
			dev = &memDev{b: make([]byte, devSize)}
			r = logwrites.NewReplayer(l, dev)
			for i := -1; i < len(ops)-1; {
				i = min(i+1+rng.IntN(20), len(ops)-1)
				if err := r.ApplyThrough(i); err != nil {
					t.Fatalf("seed %d: ApplyThrough(%d): %v", seed, i, err)
				}
				if !bytes.Equal(dev.b, images[i+1]) {
					t.Fatalf("seed %d: after a stride ending at entry %d (%v): %s",
						seed, i, ops[i], firstDiff(dev.b, images[i+1]))
				}
			}
		})
	}
}

func TestFlagsString(t *testing.T) {
	tests := []struct {
		f    logwrites.Flags
		want string
	}{
		{0, "write"},
		{logwrites.FUA, "write|fua"},
		{logwrites.Flush, "flush"},
		{logwrites.Flush | logwrites.FUA, "flush|fua"},
		{logwrites.Discard, "discard"},
		{logwrites.Mark, "mark"},
		{logwrites.Metadata | logwrites.FUA, "write|fua|metadata"},
		{logwrites.Metadata | 1<<5 | 1<<40, "write|metadata|0x10000000020"},
	}
	for _, tt := range tests {
		if got := tt.f.String(); got != tt.want {
			t.Errorf("Flags(%#x).String() = %q, want %q", uint64(tt.f), got, tt.want)
		}
	}
}

// The log used by the error tests, at sector size 512:
//
//	entry 0 at  512: write of 2 sectors at sector 4, data at 1024..2048
//	entry 1 at 2048: mark "m"
//	entry 2 at 2560: discard of 8 sectors at sector 0
//	entry 3 at 3072: FUA write of 1 sector at sector 1, data at 3584..4096
func errorTestLog() ([]op, []byte) {
	ops := []op{
		{off: 4 * 512, data: pattern(10, 1024)},
		{flags: logwrites.Mark, text: "m"},
		{flags: logwrites.Discard, off: 0, n: 8 * 512},
		{flags: logwrites.FUA, off: 512, data: pattern(11, 512)},
	}
	return ops, buildLog(512, ops)
}

func TestOpenErrors(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name      string
		edit      func(b []byte) []byte
		entry     int   // FormatError.Entry wanted
		logOffset int64 // FormatError.Offset wanted
		msg       string
	}{
		{"short super", func(b []byte) []byte { return b[:20] }, -1, 0, "too short"},
		{"bad magic", func(b []byte) []byte { b[0] ^= 1; return b }, -1, 0, "magic"},
		{"unknown version", func(b []byte) []byte { le.PutUint64(b[8:], 2); return b }, -1, 0,
			"version 2"},
		{"sector size 0", func(b []byte) []byte { le.PutUint32(b[24:], 0); return b }, -1, 0,
			"sector size"},
		{"sector size 256", func(b []byte) []byte { le.PutUint32(b[24:], 256); return b }, -1, 0,
			"sector size"},
		{"sector size 1000", func(b []byte) []byte { le.PutUint32(b[24:], 1000); return b }, -1, 0,
			"sector size"},
		{"sector size 1 MiB", func(b []byte) []byte { le.PutUint32(b[24:], mib); return b }, -1, 0,
			"sector size"},
		{"super block truncated", func(b []byte) []byte { return b[:300] }, -1, 0,
			"shorter than its super block"},
		{"nr_entries huge", func(b []byte) []byte { le.PutUint64(b[16:], 1<<40); return b }, -1, 0,
			"nr_entries"},
		{"nr_entries max", func(b []byte) []byte { le.PutUint64(b[16:], 1<<64-1); return b }, -1, 0,
			"nr_entries"},
		{"nr_entries more than the blocks", func(b []byte) []byte {
			le.PutUint64(b[16:], 8) // 4096/512 - 1 = 7 blocks after the super block
			return b
		}, -1, 0, "nr_entries 8"},
		{"nr_entries one too many", func(b []byte) []byte {
			le.PutUint64(b[16:], 5)
			return b
		}, 4, 4096, "header block truncated"},
		{"nr_entries counts a zeroed block", func(b []byte) []byte {
			le.PutUint64(b[16:], 5)
			return append(b, make([]byte, 512)...)
		}, 4, 4096, "zeroed block"},
		{"truncated header", func(b []byte) []byte { return b[:3072+100] }, 3, 3072,
			"header block truncated"},
		{"data past the end", func(b []byte) []byte { return b[:3584+100] }, 3, 3072,
			"runs past the end"},
		{"nr_sectors past the end", func(b []byte) []byte {
			le.PutUint64(b[512+8:], 1<<40)
			return b
		}, 0, 512, "runs past the end"},
		{"nr_sectors overflows", func(b []byte) []byte {
			le.PutUint64(b[2560+8:], 1<<62)
			return b
		}, 2, 2560, "too large"},
		{"sector overflows", func(b []byte) []byte {
			le.PutUint64(b[2560:], 1<<62)
			return b
		}, 2, 2560, "too large"},
		{"range overflows", func(b []byte) []byte {
			le.PutUint64(b[2560:], (1<<63-1)/512)
			return b
		}, 2, 2560, "overflows"},
		{"mark longer than its block", func(b []byte) []byte {
			le.PutUint64(b[2048+24:], 512-31)
			return b
		}, 1, 2048, "does not fit"},
		{"mark length huge", func(b []byte) []byte {
			le.PutUint64(b[2048+24:], 1<<63)
			return b
		}, 1, 2048, "does not fit"},
		{"mark with nr_sectors", func(b []byte) []byte {
			le.PutUint64(b[2048+8:], 1)
			return b
		}, 1, 2048, "mark with nr_sectors"},
		{"mark with fua", func(b []byte) []byte {
			le.PutUint64(b[2048+16:], uint64(logwrites.Mark|logwrites.FUA))
			return b
		}, 1, 2048, "mark with other flags"},
		{"data_len on a write", func(b []byte) []byte {
			le.PutUint64(b[512+24:], 1)
			return b
		}, 0, 512, "data_len 1"},
		{"unknown flags", func(b []byte) []byte {
			le.PutUint64(b[3072+16:], uint64(logwrites.FUA|1<<5))
			return b
		}, 3, 3072, "unknown flags 0x20"},
		{"dirty header padding", func(b []byte) []byte { b[512+100] = 1; return b }, 0, 512,
			"padding"},
		{"dirty padding after a mark", func(b []byte) []byte { b[2048+32+1] = 'x'; return b }, 1, 2048,
			"padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, b := errorTestLog()
			b = tt.edit(b)
			l, err := logwrites.Open(bytes.NewReader(b), int64(len(b)))
			if err == nil {
				t.Fatalf("Open succeeded with %d entries, want an error", len(l.Entries))
			}
			var fe *logwrites.FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("Open: %v (%T), want a *FormatError", err, err)
			}
			if fe.Entry != tt.entry || fe.Offset != tt.logOffset || !strings.Contains(fe.Msg, tt.msg) {
				t.Fatalf("Open: %v: got entry %d offset %d, want entry %d offset %d and %q",
					err, fe.Entry, fe.Offset, tt.entry, tt.logOffset, tt.msg)
			}
			if tt.entry >= 0 {
				where := fmt.Sprintf("entry %d at log offset %d", tt.entry, tt.logOffset)
				if !strings.Contains(err.Error(), where) {
					t.Errorf("error %q does not say %q", err, where)
				}
			}
		})
	}
}

func TestErrorTestLogIsValid(t *testing.T) {
	ops, b := errorTestLog()
	if len(b) != 4096 {
		t.Fatalf("log is %d bytes, the error tests assume 4096", len(b))
	}
	l := mustOpen(t, b)
	checkEntries(t, l, ops, 512)
}

// failingReader fails every read that reaches past off.
type failingReader struct {
	r   io.ReaderAt
	off int64
	err error
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.off {
		return 0, f.err
	}
	return f.r.ReadAt(p, off)
}

func TestReadErrors(t *testing.T) {
	errBroken := errors.New("broken disk")
	_, b := errorTestLog()

	_, err := logwrites.Open(failingReader{bytes.NewReader(b), 0, errBroken}, int64(len(b)))
	if !errors.Is(err, errBroken) || !strings.Contains(err.Error(), "super block") {
		t.Errorf("Open with a failing super block: %v, want %v, wrapped", err, errBroken)
	}
	_, err = logwrites.Open(failingReader{bytes.NewReader(b), 2100, errBroken}, int64(len(b)))
	if !errors.Is(err, errBroken) || !strings.Contains(err.Error(), "entry 1 at log offset 2048") {
		t.Errorf("Open with a failing entry 1: %v, want %v, wrapped, naming the entry", err, errBroken)
	}

	// A log whose size is more than the reader holds: Open reads headers
	// only and succeeds, reading the missing data fails.
	l, err := logwrites.Open(bytes.NewReader(b[:3584+100]), int64(len(b)))
	if err != nil {
		t.Fatalf("Open of a log whose data is cut: %v", err)
	}
	e := l.Entries[3]
	if err := l.ReadData(e, make([]byte, e.Length)); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("ReadData of cut data: %v, want %v", err, io.ErrUnexpectedEOF)
	}

	// Data that fails to read once the log is open.
	l, err = logwrites.Open(failingReader{bytes.NewReader(b), 3584, errBroken}, int64(len(b)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	e = l.Entries[3]
	if err := l.ReadData(e, make([]byte, e.Length)); !errors.Is(err, errBroken) {
		t.Errorf("ReadData of unreadable data: %v, want %v", err, errBroken)
	}
	dev := &memDev{b: make([]byte, 4096)}
	r := logwrites.NewReplayer(l, dev)
	if err := r.ApplyThrough(3); !errors.Is(err, errBroken) ||
		!strings.Contains(err.Error(), "entry 3") {
		t.Errorf("ApplyThrough of unreadable data: %v, want %v naming entry 3", err, errBroken)
	}
}

func TestReadData(t *testing.T) {
	ops, b := errorTestLog()
	l := mustOpen(t, b)
	w := l.Entries[0]
	got := make([]byte, w.Length)
	if err := l.ReadData(w, got); err != nil || !bytes.Equal(got, ops[0].data) {
		t.Errorf("ReadData(write) = %v, or wrong data", err)
	}
	if err := l.ReadData(w, make([]byte, w.Length-1)); err == nil {
		t.Error("ReadData into a short buffer succeeded")
	}
	if err := l.ReadData(w, make([]byte, w.Length+1)); err == nil {
		t.Error("ReadData into a long buffer succeeded")
	}
	if err := l.ReadData(l.Entries[1], nil); err != nil {
		t.Errorf("ReadData(mark, nil) = %v, want nil", err)
	}
	d := l.Entries[2]
	if err := l.ReadData(d, make([]byte, d.Length)); err == nil {
		t.Error("ReadData(discard) succeeded")
	}
	forged := w
	forged.Length = 512
	if err := l.ReadData(forged, make([]byte, 512)); err == nil {
		t.Error("ReadData of an entry not from the log succeeded")
	}
	if err := l.ReadData(logwrites.Entry{Index: 7}, nil); err == nil {
		t.Error("ReadData of an index out of range succeeded")
	}
}

func TestApplyThroughErrors(t *testing.T) {
	ops, b := errorTestLog()
	l := mustOpen(t, b)
	dev := &memDev{b: make([]byte, 8*512)}
	r := logwrites.NewReplayer(l, dev)
	if err := r.ApplyThrough(4); err == nil {
		t.Error("ApplyThrough past the end succeeded")
	}
	if err := r.ApplyThrough(-1); err == nil {
		t.Error("ApplyThrough(-1) succeeded")
	}
	if r.Next() != 0 {
		t.Fatalf("Next() = %d after failed calls, want 0", r.Next())
	}
	if err := r.ApplyThrough(1); err != nil {
		t.Fatalf("ApplyThrough(1): %v", err)
	}
	for _, i := range []int{0, 1} {
		if err := r.ApplyThrough(i); err == nil || !strings.Contains(err.Error(), "forward") {
			t.Errorf("ApplyThrough(%d) after 1: %v, want an error about going backwards", i, err)
		}
	}
	if r.Next() != 2 {
		t.Fatalf("Next() = %d, want 2", r.Next())
	}
	if err := r.ApplyThrough(3); err != nil {
		t.Fatalf("ApplyThrough(3) after refused calls: %v", err)
	}
	want := make([]byte, len(dev.b))
	for _, o := range ops {
		applyOp(want, o)
	}
	if !bytes.Equal(dev.b, want) {
		t.Errorf("image after refused calls: %s", firstDiff(dev.b, want))
	}
	if err := r.ApplyThrough(3); err == nil {
		t.Error("ApplyThrough(3) twice succeeded")
	}
}

// TestDeviceTooSmall checks that an entry beyond the device fails, names the
// entry, and stops the replay for good.
func TestDeviceTooSmall(t *testing.T) {
	_, b := errorTestLog()
	l := mustOpen(t, b)
	// Entry 0 writes sectors 4..5: past the end of a 5-sector device.
	dev := &memDev{b: make([]byte, 5*512)}
	r := logwrites.NewReplayer(l, dev)
	err := r.ApplyThrough(3)
	if err == nil || !strings.Contains(err.Error(), "entry 0") {
		t.Fatalf("ApplyThrough onto a too small device: %v, want an error naming entry 0", err)
	}
	if r.Next() != 0 {
		t.Errorf("Next() = %d after entry 0 failed, want 0", r.Next())
	}
	if err2 := r.ApplyThrough(3); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("ApplyThrough after a failure: %v, want the same error again", err2)
	}
}

// mustOpen opens the log in b, failing the test if it cannot.
func mustOpen(t *testing.T, b []byte) *logwrites.Log {
	t.Helper()
	l, err := logwrites.Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}
