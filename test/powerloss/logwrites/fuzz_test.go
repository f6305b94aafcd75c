package logwrites_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"testing"

	"github.com/nbdsnap/nbdsnap/test/powerloss/logwrites"
)

// fuzzDevSize caps the device a fuzzed log is replayed onto, so that entries
// at any offset cost at most this much memory. It is small because the
// fuzzer runs the target many times per second, minimization included.
const fuzzDevSize = 64 << 10

// FuzzOpen checks that any bytes either fail to open or give a log whose every
// entry's data can be read and that replays onto a bounded device, with
// entries outside the device failing rather than panicking.
func FuzzOpen(f *testing.F) {
	// Seeds are small valid logs from the test writer: the fuzzer minimizes
	// every input it finds interesting, in time quadratic in its size, so
	// large seeds leave it little time to explore.
	f.Add(buildLog(512, []op{{flags: logwrites.Mark, text: "m"}}))
	f.Add(buildLog(512, []op{{flags: logwrites.FUA | logwrites.Metadata, off: 63 << 10,
		data: pattern(2, 512)}}))
	f.Add(buildLog(512, []op{
		{flags: logwrites.Discard, off: 60 << 10, n: 8 << 10},
		{flags: logwrites.Flush},
	}))
	_, b := errorTestLog() // a write, a mark, a discard and a FUA write
	f.Add(b)
	f.Add(buildLog(4096, []op{{flags: logwrites.Mark, text: "dm-log-writes-end"}}))
	f.Fuzz(checkAnyLog)
}

// checkAnyLog is the body of FuzzOpen.
func checkAnyLog(t *testing.T, b []byte) {
	l, err := logwrites.Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		if l != nil {
			t.Fatalf("Open returned a log and an error: %v", err)
		}
		return
	}
	if len(l.Entries) > len(b)/l.SectorSize {
		t.Fatalf("%d entries in a %d-byte log with %d-byte sectors",
			len(l.Entries), len(b), l.SectorSize)
	}
	var logged int64 // bytes of data the entries claim in the log
	for i, e := range l.Entries {
		if e.Index != i || e.Offset < 0 || e.Length < 0 || e.Offset > math.MaxInt64-e.Length {
			t.Fatalf("entry %d: bad fields %+v", i, e)
		}
		if e.Flags&logwrites.Mark != 0 {
			if e.Length != 0 || len(e.Mark) > l.SectorSize-32 || l.FindMark(e.Mark) > i {
				t.Fatalf("entry %d: bad mark %+v", i, e)
			}
		}
		if e.Flags&logwrites.Discard != 0 {
			continue
		}
		logged += e.Length
		if logged > int64(len(b)) {
			t.Fatalf("entries claim %d bytes of data in a %d-byte log", logged, len(b))
		}
		p := make([]byte, e.Length)
		if err := l.ReadData(e, p); err != nil {
			t.Fatalf("ReadData(entry %d): %v", i, err)
		}
	}

	dev := &memDev{b: make([]byte, fuzzDevSize)}
	r := logwrites.NewReplayer(l, dev)
	for i, e := range l.Entries {
		err := r.ApplyThrough(i)
		outside := e.Length > 0 && (e.Offset > fuzzDevSize || e.Length > fuzzDevSize-e.Offset)
		if outside != (err != nil) {
			t.Fatalf("ApplyThrough(%d) of %v on a %d-byte device: %v", i, e, fuzzDevSize, err)
		}
		if err != nil {
			if err2 := r.ApplyThrough(i); err2 == nil {
				t.Fatalf("ApplyThrough(%d) succeeded after failing", i)
			}
			break
		}
		// Forward only.
		if err := r.ApplyThrough(i); err == nil {
			t.Fatalf("ApplyThrough(%d) twice succeeded", i)
		}
	}
	if err := r.ApplyThrough(len(l.Entries)); err == nil {
		t.Fatal("ApplyThrough past the end succeeded")
	}
}

// TestOpenGarbage checks that a valid super block followed by garbage gives a
// FormatError for the first entry.
func TestOpenGarbage(t *testing.T) {
	junk := bytes.Repeat([]byte{0xff}, 4096)
	binary.LittleEndian.PutUint64(junk, 0x6a736677736872)
	binary.LittleEndian.PutUint64(junk[8:], 1)
	binary.LittleEndian.PutUint64(junk[16:], 3)
	binary.LittleEndian.PutUint32(junk[24:], 512)
	var fe *logwrites.FormatError
	if _, err := logwrites.Open(bytes.NewReader(junk), int64(len(junk))); !errors.As(err, &fe) ||
		fe.Entry != 0 || fe.Offset != 512 {
		t.Fatalf("Open of garbage entries: %v, want a FormatError for entry 0 at 512", err)
	}
}
