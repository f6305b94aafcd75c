package backstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/bits"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// FuzzOpenProgress opens arbitrary bytes as a rollback progress file. With
// reseal set, the fuzz function first repairs the header's CRC, so that the
// fuzzer reaches the field checks instead of stopping at the checksum.
// OpenProgress must not panic and must classify every failure
// (ErrNoProgress only for a file shorter than a header or with a zero
// header); a file that opens must re-encode to its own header, count its
// bits right (Done ≤ Entries), and take more marks that a Sync makes
// durable and a reopen reads back.
func FuzzOpenProgress(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "progress-v1.golden"))
	if err != nil {
		f.Fatal(err)
	}
	le := binary.LittleEndian
	f.Add(golden, false)
	f.Add(golden, true)
	f.Add(golden[:progressHeaderSize], false) // no bitmap
	f.Add(golden[:100], false)                // shorter than a header
	f.Add(make([]byte, progressHeaderSize+2), false)
	corrupt := func(change func(b []byte)) []byte {
		b := bytes.Clone(golden)
		change(b)
		return b
	}
	f.Add(corrupt(func(b []byte) { b[progressHeaderSize] = 0xff }), false)                 // more bits than entries
	f.Add(corrupt(func(b []byte) { le.PutUint32(b[8:], 2) }), true)                        // newer version
	f.Add(corrupt(func(b []byte) { le.PutUint32(b[48:], 16) }), true)                      // every cluster to restore
	f.Add(corrupt(func(b []byte) { le.PutUint64(b[40:], 13*4096-100); b[36] = 13 }), true) // partial last byte
	f.Add(corrupt(func(b []byte) { b[40] ^= 1 }), false)                                   // bad CRC
	f.Fuzz(func(t *testing.T, b []byte, reseal bool) {
		if len(b) > 4<<20 {
			return
		}
		b = bytes.Clone(b)
		if reseal && len(b) >= progressHeaderSize {
			le.PutUint32(b[progressCRCOff:], checksum(b[:progressCRCOff]))
		}
		fs := vfstest.NewMemFS()
		file := openMem(t, fs, "progress")
		if len(b) > 0 {
			if _, err := file.WriteAt(b, 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := file.Sync(); err != nil {
			t.Fatal(err)
		}
		p, err := OpenProgress(file)
		if err != nil {
			noProgress := len(b) < progressHeaderSize || allZero(b[:progressHeaderSize])
			switch {
			case errors.Is(err, ErrNoProgress) != noProgress:
				t.Fatalf("%v for a file of %d bytes (header all zero: %v)", err, len(b), noProgress)
			case !errors.Is(err, ErrNoProgress) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion):
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		info := p.Info()
		if err := info.check(); err != nil {
			t.Fatalf("opened with info %+v: %v", info, err)
		}
		if !bytes.Equal(encodeProgressHeader(info), b[:progressHeaderSize]) {
			t.Fatal("decode/encode changed the header")
		}
		n := int(bitmapBytes(info.Clusters()))
		ones := 0
		for _, c := range b[progressHeaderSize : progressHeaderSize+n] {
			ones += bits.OnesCount8(c)
		}
		if p.Done() != uint32(ones) || p.Done() > info.Entries || p.Complete() != (p.Done() == info.Entries) {
			t.Fatalf("done %d, %d bits set, %d entries, complete %v", p.Done(), ones, info.Entries, p.Complete())
		}
		// Mark up to 64 more clusters spread over the origin, as a rollback
		// would (never more than Entries in all), and Sync.
		before := restoredSet(p)
		want := restoredSet(p)
		clusters := info.Clusters()
		step := max(1, clusters/64)
		for c := uint32(0); c < clusters && p.Done() < info.Entries; c += step {
			if !p.Restored(c) {
				p.Mark(c)
				want[c] = true
			}
			if !p.Restored(c) {
				t.Fatalf("cluster %d not restored after Mark", c)
			}
		}
		if err := p.Sync(noBefore); err != nil {
			t.Fatal(err)
		}
		p.Close()
		// What a crash now keeps: the marks, and nothing else changed.
		p2, err := OpenProgress(openMem(t, fs.CrashClone(vfstest.CrashOptions{}), "progress"))
		if err != nil {
			t.Fatalf("reopen after %d marks: %v", len(want)-len(before), err)
		}
		defer p2.Close()
		if !sameProgressInfo(p2.Info(), info) {
			t.Fatalf("reopened info %+v, was %+v", p2.Info(), info)
		}
		got := restoredSet(p2)
		if len(got) != len(want) || p2.Done() != uint32(len(want)) {
			t.Fatalf("reopened with %d restored (done %d), want %d", len(got), p2.Done(), len(want))
		}
		for c := range want {
			if !got[c] {
				t.Fatalf("cluster %d lost across Sync and reopen", c)
			}
		}
		after, _ := fs.Contents("progress")
		if !bytes.Equal(after[:progressHeaderSize], b[:progressHeaderSize]) || !bytes.Equal(after[progressHeaderSize+n:], b[progressHeaderSize+n:]) {
			t.Fatal("Sync wrote outside the bitmap")
		}
	})
}
