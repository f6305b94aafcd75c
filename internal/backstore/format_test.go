package backstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var goldenUUID = uuid.MustParse("6e627364-6e61-7073-8000-000000000001")

func goldenHeader() Header {
	g, _ := geometryOf(4096, 64<<10, true)
	return Header{
		Version: 1, Generation: 1, UUID: goldenUUID, Name: "snap0", OriginID: "disk0",
		OriginSize: 64 << 10, ClusterSize: 4096, Created: time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC),
		Persistent: true, State: StateValid, BatchBase: 1, DataStart: g.dataStart,
	}
}

// reseal recomputes the CRC of a header slot or metadata block after a
// test changed it.
func reseal(b []byte) {
	binary.LittleEndian.PutUint32(b[crcOff:], checksum(b[:crcOff]))
}

func TestHeaderEncoding(t *testing.T) {
	good := make([]byte, headerSize)
	h := goldenHeader()
	encodeHeader(&h, good)
	got, err := decodeHeader(good)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, h) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, h)
	}
	clean := h
	clean.Clean, clean.CleanBatch, clean.CleanCount = true, 9, 16
	cb := make([]byte, headerSize)
	encodeHeader(&clean, cb)
	if got, err := decodeHeader(cb); err != nil || !reflect.DeepEqual(got, clean) {
		t.Fatalf("clean round trip: %+v, %v", got, err)
	}
	clean.CleanBatch, clean.CleanCount = 0, 0 // an empty store closed cleanly
	encodeHeader(&clean, cb)
	if got, err := decodeHeader(cb); err != nil || !reflect.DeepEqual(got, clean) {
		t.Fatalf("clean empty round trip: %+v, %v", got, err)
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name   string
		change func(b []byte)
		want   error
	}{
		{"bad magic", func(b []byte) { b[0] = 'X'; reseal(b) }, ErrNotStore},
		{"zeros", func(b []byte) { clear(b) }, ErrNotStore},
		{"newer version, bad crc", func(b []byte) { le.PutUint32(b[8:], 3) }, ErrVersion},
		{"newer version", func(b []byte) { le.PutUint32(b[8:], 3); reseal(b) }, ErrVersion},
		{"bases in version 1", func(b []byte) { le.PutUint16(b[basesOff:], 1); reseal(b) }, ErrCorrupt},
		{"version 0", func(b []byte) { le.PutUint32(b[8:], 0); reseal(b) }, ErrNotStore},
		{"checksum", func(b []byte) { b[200] ^= 1 }, ErrNotStore},
		{"unknown flag", func(b []byte) { b[12] |= 4; reseal(b) }, ErrCorrupt},
		{"state", func(b []byte) { le.PutUint32(b[44:], 3); reseal(b) }, ErrCorrupt},
		{"cluster size not a power of two", func(b []byte) { le.PutUint32(b[40:], 4097); reseal(b) }, ErrCorrupt},
		{"cluster size too big", func(b []byte) { le.PutUint32(b[40:], 2<<20); reseal(b) }, ErrCorrupt},
		{"origin size 0", func(b []byte) { le.PutUint64(b[48:], 0); reseal(b) }, ErrCorrupt},
		{"origin too big", func(b []byte) { le.PutUint64(b[48:], 1<<62); reseal(b) }, ErrCorrupt},
		{"negative max size", func(b []byte) { le.PutUint64(b[64:], 1<<63); reseal(b) }, ErrCorrupt},
		{"batch base 0", func(b []byte) { le.PutUint64(b[72:], 0); reseal(b) }, ErrCorrupt},
		{"data start", func(b []byte) { le.PutUint64(b[80:], 4096); reseal(b) }, ErrCorrupt},
		{"name too long", func(b []byte) { le.PutUint16(b[88:], 256); reseal(b) }, ErrCorrupt},
		{"byte after name", func(b []byte) { b[nameOff+5] = 'x'; reseal(b) }, ErrCorrupt},
		{"reserved", func(b []byte) { b[100] = 1; reseal(b) }, ErrCorrupt},
		{"after reason", func(b []byte) { b[4000] = 1; reseal(b) }, ErrCorrupt},
		{"clean mark 2", func(b []byte) { le.PutUint32(b[cleanMarkOff:], 2); reseal(b) }, ErrCorrupt},
		{"clean batch without mark", func(b []byte) { le.PutUint64(b[cleanBatchOff:], 3); reseal(b) }, ErrCorrupt},
		{"clean count without mark", func(b []byte) { le.PutUint32(b[cleanCountOff:], 3); reseal(b) }, ErrCorrupt},
		{"clean batch 0 with entries", func(b []byte) {
			le.PutUint32(b[cleanMarkOff:], 1)
			le.PutUint32(b[cleanCountOff:], 3)
			reseal(b)
		}, ErrCorrupt},
		{"clean batch without entries", func(b []byte) {
			le.PutUint32(b[cleanMarkOff:], 1)
			le.PutUint64(b[cleanBatchOff:], 3)
			reseal(b)
		}, ErrCorrupt},
		{"clean count past origin", func(b []byte) {
			le.PutUint32(b[cleanMarkOff:], 1)
			le.PutUint64(b[cleanBatchOff:], 3)
			le.PutUint32(b[cleanCountOff:], 17)
			reseal(b)
		}, ErrCorrupt},
		{"clean transient", func(b []byte) {
			le.PutUint32(b[12:], 0)
			le.PutUint64(b[80:], 8192)
			le.PutUint32(b[cleanMarkOff:], 1)
			reseal(b)
		}, ErrCorrupt},
		{"byte 95", func(b []byte) { b[95] = 1; reseal(b) }, ErrCorrupt},
		{"byte 112", func(b []byte) { b[112] = 1; reseal(b) }, ErrCorrupt},
	} {
		b := bytes.Clone(good)
		tc.change(b)
		if _, err := decodeHeader(b); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if got := truncateUTF8(strings.Repeat("é", 1500), maxReasonLen); len(got) != 2048 {
		t.Errorf("truncateUTF8 kept %d bytes", len(got))
	}
	if got := truncateUTF8("a"+strings.Repeat("é", 1500), maxReasonLen); len(got) != 2047 {
		t.Errorf("truncateUTF8 split a rune: %d bytes", len(got))
	}
}

// TestHeaderV2 pins version 2's additions: the base table and the bookmark
// flag round-trip, make the header version 2, and are checked on decode.
func TestHeaderV2(t *testing.T) {
	h := goldenHeader()
	h.Bookmark = true
	for i := range MaxBases {
		h.Bases = append(h.Bases, Base{UUID: uuid.UUID{15: byte(i + 1)}, Entries: uint32(i * 1000)})
	}
	good := make([]byte, headerSize)
	encodeHeader(&h, good)
	le := binary.LittleEndian
	if h.Version != 2 || le.Uint32(good[8:]) != 2 || good[12] != flagPersistent|flagBookmark {
		t.Fatalf("version %d, flags %#x: want version 2 with the bookmark flag", le.Uint32(good[8:]), good[12])
	}
	got, err := decodeHeader(good)
	if err != nil || !reflect.DeepEqual(got, h) {
		t.Fatalf("round trip: %v\n got %+v\nwant %+v", err, got, h)
	}
	if end := basesOff + 4 + baseEntryLen*MaxBases; end > crcOff {
		t.Fatalf("the base table ends at %d, past the CRC", end)
	}
	for _, tc := range []struct {
		name   string
		change func(b []byte)
	}{
		{"too many bases", func(b []byte) { le.PutUint16(b[basesOff:], MaxBases+1) }},
		{"byte after count", func(b []byte) { b[basesOff+2] = 1 }},
		{"zero base UUID", func(b []byte) { clear(b[basesOff+4 : basesOff+20]) }},
		{"own UUID as base", func(b []byte) { copy(b[basesOff+4:], goldenUUID[:]) }},
		{"entries past any origin", func(b []byte) { le.PutUint32(b[basesOff+20:], MaxClusters+1) }},
		{"bookmark of a transient store", func(b []byte) {
			le.PutUint32(b[12:], flagBookmark)
			le.PutUint64(b[80:], 8192)
		}},
		{"after the bases", func(b []byte) { le.PutUint16(b[basesOff:], 3) }},
	} {
		b := bytes.Clone(good)
		tc.change(b)
		reseal(b)
		if _, err := decodeHeader(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", tc.name, err)
		}
	}
}

func TestMetaBlockEncoding(t *testing.T) {
	const maxC = 2000 // 4 blocks
	m := metaBlock{lblock: 1, batch: 7, uuid: goldenUUID, first: 600, total: 1100}
	for i := 0; i < 505; i++ {
		m.entries = append(m.entries, entry{cluster: uint32(i * 3), crc: uint32(i) * 0x01010101})
	}
	good := make([]byte, blockSize)
	encodeMetaBlock(&m, good)
	got, err := decodeMetaBlock(good, 1, goldenUUID, maxC, true)
	if err != nil {
		t.Fatal(err)
	}
	if got.lblock != 1 || got.batch != 7 || got.first != 600 || got.total != 1100 || len(got.entries) != 505 || got.entries[504] != m.entries[504] {
		t.Fatalf("round trip: %+v", got)
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name   string
		l      int64
		id     uuid.UUID
		change func(b []byte)
	}{
		{"bad magic", 1, goldenUUID, func(b []byte) { b[0] = 'x'; reseal(b) }},
		{"checksum", 1, goldenUUID, func(b []byte) { b[100] ^= 1 }},
		{"misplaced", 2, goldenUUID, func(b []byte) {}},
		{"other store", 1, uuid.UUID{1}, func(b []byte) {}},
		{"batch 0", 1, goldenUUID, func(b []byte) { le.PutUint64(b[8:], 0); reseal(b) }},
		{"first = total", 1, goldenUUID, func(b []byte) { le.PutUint32(b[32:], 1100); reseal(b) }},
		{"total past origin", 1, goldenUUID, func(b []byte) { le.PutUint32(b[36:], maxC+1); reseal(b) }},
		{"batch ends before block", 1, goldenUUID, func(b []byte) { le.PutUint32(b[32:], 10); le.PutUint32(b[36:], 500); reseal(b) }},
		{"batch starts after block", 1, goldenUUID, func(b []byte) { le.PutUint32(b[32:], 1010); reseal(b) }},
		{"entry count", 1, goldenUUID, func(b []byte) { le.PutUint32(b[40:], 504); reseal(b) }},
		{"reserved", 1, goldenUUID, func(b []byte) { b[45] = 1; reseal(b) }},
		{"trailer", 1, goldenUUID, func(b []byte) { b[4090] = 1; reseal(b) }},
		{"cluster out of range", 1, goldenUUID, func(b []byte) { le.PutUint32(b[blockHeader+8*7:], maxC); reseal(b) }},
	} {
		b := bytes.Clone(good)
		tc.change(b)
		if _, err := decodeMetaBlock(b, tc.l, tc.id, maxC, true); err == nil {
			t.Errorf("%s: decoded", tc.name)
		}
	}
	// A partial block: unused entries must be zero.
	m.entries = m.entries[:1100-1010]
	m.lblock, m.first, m.total = 2, 1050, 1100
	encodeMetaBlock(&m, good)
	if _, err := decodeMetaBlock(good, 2, goldenUUID, maxC, true); err != nil {
		t.Fatalf("partial block: %v", err)
	}
	good[blockHeader+8*90] = 1
	reseal(good)
	if _, err := decodeMetaBlock(good, 2, goldenUUID, maxC, true); err == nil {
		t.Error("garbage in an unused entry accepted")
	}
}

// goldenStore builds the store of the worked example in format.go.
func goldenStore(t *testing.T) []byte {
	fs := vfstest.NewMemFS()
	h := goldenHeader()
	s, err := Create(openMem(t, fs, "store"), Options{
		Name: h.Name, OriginID: h.OriginID, OriginSize: h.OriginSize, ClusterSize: h.ClusterSize,
		Persistent: true, Created: h.Created, UUID: goldenUUID,
	})
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 7, 3, 9)
	commitClusters(t, s, 7, 5)
	s.Close()
	b, err := fs.Contents("store")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGolden pins the format: the worked example's bytes must not change
// (run with -update after a deliberate format change, and bump Version),
// and the pinned files must keep opening: the store after a clean Close,
// and the same store as written before the clean mark existed.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "store-v1.golden")
	got := goldenStore(t)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				t.Fatalf("store bytes differ from %s first at offset %d (len %d vs %d): the format changed", path, i, len(got), len(want))
			}
		}
		t.Fatalf("store is %d bytes, %s is %d", len(got), path, len(want))
	}
	// The worked example's offsets.
	if len(want) != 16384+3*4096 || string(want[0:8]) != "NBSSTORE" || string(want[8192:8196]) != "NBSM" || string(want[12288:12292]) != "NBSM" {
		t.Fatalf("golden file does not match the worked example's layout")
	}
	unmarked, err := os.ReadFile(filepath.Join("testdata", "store-v1-unmarked.golden"))
	if err != nil {
		t.Fatal(err)
	}
	// The two differ in header slot 0 only: generation, clean mark, CRC.
	if !bytes.Equal(want[headerSize:], unmarked[headerSize:]) {
		t.Fatal("the golden files differ past header slot 0")
	}
	for i := range headerSize {
		if want[i] != unmarked[i] && i != 16 && (i < cleanBatchOff || i >= cleanEnd) && i < crcOff {
			t.Fatalf("the golden files' slot 0 differ at byte %d", i)
		}
	}

	fs := vfstest.NewMemFS()
	for _, tc := range []struct {
		name  string
		b     []byte
		clean bool
	}{{"marked", want, true}, {"unmarked", unmarked, false}} {
		f := openMem(t, fs, tc.name)
		if _, err := f.WriteAt(tc.b, 0); err != nil {
			t.Fatal(err)
		}
		if rep, err := Check(openMem(t, fs, tc.name)); err != nil || rep.Header.Clean != tc.clean ||
			tc.clean && (rep.Header.CleanBatch != 2 || rep.Header.CleanCount != 3) || len(rep.Notices) != 0 {
			t.Fatalf("%s: Check: %+v, %v", tc.name, rep, err)
		}
		s, err := Open(f, nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		h := s.Header()
		if h.Name != "snap0" || h.OriginID != "disk0" || h.UUID != goldenUUID || h.ClusterSize != 4096 || h.OriginSize != 64<<10 || h.State != StateValid || h.Clean {
			t.Errorf("%s: golden header: %+v", tc.name, h)
		}
		if rec := s.Recovery(); rec.Clean != tc.clean || rec.CommittedBatch != 2 || rec.Clusters != 3 || len(rec.Dropped) != 0 || rec.Corrupt != "" {
			t.Errorf("%s: recovery %+v", tc.name, rec)
		}
		verifyStore(t, s, 7, map[uint32]bool{3: true, 9: true, 5: true})
		s.Close()
	}

	// The same store claiming format version 3 is refused, untouched.
	v3 := bytes.Clone(want)
	for slot := 0; slot < 2; slot++ {
		b := v3[slot*headerSize : (slot+1)*headerSize]
		binary.LittleEndian.PutUint32(b[8:], 3)
		reseal(b)
	}
	f3 := openMem(t, fs, "v3")
	f3.WriteAt(v3, 0)
	if _, err := Open(f3, nil); !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 3") {
		t.Fatalf("open of a version-3 store: %v, want ErrVersion naming the version", err)
	}
	if b, _ := fs.Contents("v3"); !bytes.Equal(b, v3) {
		t.Error("refused store was modified")
	}
}

func TestTornHeaderWrite(t *testing.T) {
	// Invalidate writes the next generation into the other slot; tear that
	// write at every sector and the store must open, as before or after.
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "s"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 3, 1, 2)
	before := fs.MutationCount()
	var clones []*vfstest.MemFS
	fs.OnOp(func(op vfstest.Op) {
		if op.Kind == vfstest.OpSync && op.Seq == before+2 {
			for seed := uint64(0); seed < 20; seed++ {
				clones = append(clones, fs.CrashClone(vfstest.CrashOptions{Rand: newRand(seed), TornWrites: true}))
			}
		}
	})
	if err := s.Invalidate("torn"); err != nil {
		t.Fatal(err)
	}
	if len(clones) == 0 {
		t.Fatal("no crash taken during the header write")
	}
	states := map[State]int{}
	for i, c := range clones {
		s2, err := Open(openMem(t, c, "s"), nil)
		if err != nil {
			t.Fatalf("clone %d: %v", i, err)
		}
		states[s2.Header().State]++
		verifyStore(t, s2, 3, map[uint32]bool{1: true, 2: true})
	}
	if states[StateValid] == 0 || states[StateInvalid] == 0 {
		t.Errorf("torn header writes gave states %v; want both outcomes", states)
	}
}

// TestGoldenV2 pins version 2: the worked example's store created with two
// bases, turned into a bookmark after its first commit, given one more
// cluster (without data) and closed. The bytes must not change, and the file
// must keep opening with its bases, its bookmark flag and its entries in
// commit order.
func TestGoldenV2(t *testing.T) {
	path := filepath.Join("testdata", "store-v2.golden")
	bases := []Base{
		{UUID: uuid.MustParse("6e627364-6e61-7073-8000-0000000000b1"), Entries: 12},
		{UUID: uuid.MustParse("6e627364-6e61-7073-8000-0000000000b2"), Entries: 0},
	}
	fs := vfstest.NewMemFS()
	h := goldenHeader()
	s, err := Create(openMem(t, fs, "store"), Options{
		Name: h.Name, OriginID: h.OriginID, OriginSize: h.OriginSize, ClusterSize: h.ClusterSize,
		Persistent: true, Created: h.Created, UUID: goldenUUID, Bases: bases,
	})
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 7, 3, 9)
	if err := s.Bookmark(); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit([]Cluster{{Index: 5}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	got, err := fs.Contents("store")
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("store bytes differ from %s (len %d vs %d): the format changed", path, len(got), len(want))
	}
	if binary.LittleEndian.Uint32(want[8:]) != 2 {
		t.Fatal("the golden bookmark is not version 2")
	}
	f := openMem(t, fs, "copy")
	if _, err := f.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	s, err = Open(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	hdr := s.Header()
	if !hdr.Bookmark || !reflect.DeepEqual(hdr.Bases, bases) || hdr.Version != 2 {
		t.Fatalf("golden v2 header: %+v", hdr)
	}
	for i, c := range []uint32{3, 9, 5} {
		if e, ok := s.Entry(c); !ok || e != uint32(i) {
			t.Fatalf("cluster %d: entry %d, %v; want %d", c, e, ok, i)
		}
	}
}
