package workload

import (
	"bytes"
	"errors"
	"maps"
	"testing"
)

func TestBlockDecode(t *testing.T) {
	const seed = 42
	b := make([]byte, BlockSize)
	Block(b, seed, 7, 13)
	if seq, err := Decode(b, seed, 7); err != nil || seq != 13 {
		t.Fatalf("Decode of write 13's block 7: %d, %v", seq, err)
	}
	other := make([]byte, BlockSize)
	Block(other, seed, 7, 14)
	if bytes.Equal(b, other) {
		t.Fatal("two writes put the same content in a block")
	}
	zero := make([]byte, BlockSize)
	if seq, err := Decode(zero, seed, 7); err != nil || seq != 0 {
		t.Fatalf("Decode of zeros: %d, %v", seq, err)
	}
	bad := []struct {
		name string
		b    []byte
	}{
		{"misplaced: block 8's content at 7", func() []byte { p := make([]byte, BlockSize); Block(p, seed, 8, 13); return p }()},
		{"another seed", func() []byte { p := make([]byte, BlockSize); Block(p, seed+1, 7, 13); return p }()},
		{"torn: half of write 13, half of 14", append(append([]byte(nil), b[:BlockSize/2]...), other[BlockSize/2:]...)},
		{"one byte flipped", func() []byte { p := bytes.Clone(b); p[BlockSize-1] ^= 1; return p }()},
		{"garbage", bytes.Repeat([]byte{0xa5}, BlockSize)},
	}
	for _, c := range bad {
		if _, err := Decode(c.b, seed, 7); !errors.Is(err, ErrForeign) {
			t.Errorf("%s: error %v, want ErrForeign", c.name, err)
		}
	}
}

// record builds a Random record: write 1 (blocks 0-1), write 2 (block 2,
// FUA), sync 1 called after both were acknowledged, write 3 (block 0)
// acknowledged during the sync, write 4 (block 3) issued but never
// acknowledged.
func record() *Record {
	return &Record{Events: []Event{
		{Kind: KindWrite, Seq: 1, Block: 0, Count: 2},
		{Kind: KindWrite, Seq: 2, Block: 2, Count: 1, FUA: true},
		{Kind: KindDone, Seq: 1},
		{Kind: KindDone, Seq: 2, Mark: "fua-2"},
		{Kind: KindSync, ID: 1},
		{Kind: KindWrite, Seq: 3, Block: 0, Count: 1},
		{Kind: KindDone, Seq: 3},
		{Kind: KindSynced, ID: 1, Mark: "sync-1"},
		{Kind: KindWrite, Seq: 4, Block: 3, Count: 1},
	}}
}

func TestRequired(t *testing.T) {
	cases := []struct {
		name   string
		passed []string
		want   map[int64]int64
	}{
		{"no mark: nothing is promised", nil, map[int64]int64{}},
		{"the FUA write alone", []string{"fua-2"}, map[int64]int64{2: 2}},
		// Write 3 was acknowledged after the sync began: the sync promises
		// write 1 on block 0, not write 3.
		{"the sync", []string{"fua-2", "sync-1"}, map[int64]int64{0: 1, 1: 1, 2: 2}},
		{"the sync alone covers the FUA write acknowledged before it", []string{"sync-1"}, map[int64]int64{0: 1, 1: 1, 2: 2}},
	}
	for _, c := range cases {
		passed := map[string]bool{}
		for _, m := range c.passed {
			passed[m] = true
		}
		if got := record().Required(passed); !maps.Equal(got, c.want) {
			t.Errorf("%s: required %v, want %v", c.name, got, c.want)
		}
	}
	w := record().Writes()
	if len(w) != 4 || len(w[0]) != 2 || w[0][0] != 1 || w[0][1] != 3 || w[3][0] != 4 {
		t.Errorf("Writes: %v", w)
	}
}

func TestSnapshots(t *testing.T) {
	r := &Record{Backing: map[string]string{"s": "/b/s"}, Events: []Event{
		{Kind: KindCreate, Name: "s", Hash: "h", Mark: "create-s"},
		{Kind: KindCreated, Name: "s", Mark: "created-s"},
		{Kind: KindClear, Name: "s", Mark: "clear-s"},
		{Kind: KindCleared, Name: "s", Mark: "cleared-s"},
	}}
	cases := []struct {
		passed     []string
		must, gone bool
	}{
		{[]string{"create-s"}, false, false}, // a crash inside create: either way
		{[]string{"create-s", "created-s"}, true, false},
		{[]string{"create-s", "created-s", "clear-s"}, false, false}, // inside clear
		{[]string{"create-s", "created-s", "clear-s", "cleared-s"}, false, true},
	}
	for _, c := range cases {
		passed := map[string]bool{}
		for _, m := range c.passed {
			passed[m] = true
		}
		got := r.Snapshots(passed)
		if len(got) != 1 || got[0].Must != c.must || got[0].Gone != c.gone || got[0].Hash != "h" || got[0].Backing != "/b/s" {
			t.Errorf("after %v: %+v, want must=%v gone=%v", c.passed, got, c.must, c.gone)
		}
	}
}

func TestFiles(t *testing.T) {
	r := &Record{Events: []Event{
		{Kind: KindSync, ID: 1, Files: map[string]string{"a": "ha", "b": "hb"}},
		{Kind: KindSynced, ID: 1, Mark: "sync-1"},
		{Kind: KindDelete, Path: "a"},
		{Kind: KindSync, ID: 2, Files: map[string]string{"b": "hb", "c": "hc"}},
		{Kind: KindSynced, ID: 2, Mark: "sync-2"},
	}}
	if got := r.Files(map[string]bool{}); len(got) != 0 {
		t.Errorf("before any sync: %v", got)
	}
	got := r.Files(map[string]bool{"sync-1": true})
	want := []FileExpect{{"a", "ha", true}, {"b", "hb", false}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("after sync 1: %+v, want %+v", got, want)
	}
	got = r.Files(map[string]bool{"sync-1": true, "sync-2": true})
	want = []FileExpect{{"b", "hb", false}, {"c", "hc", false}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("after sync 2: %+v, want %+v", got, want)
	}
}

func TestRawRegions(t *testing.T) {
	regs := RawRegions(16 << 20)
	var end int64
	for _, r := range regs {
		if r.Offset != end || r.Size <= 0 {
			t.Fatalf("regions %+v: not contiguous", regs)
		}
		end += r.Size
	}
	if regs[0].Name != "origin" || regs[len(regs)-1].Name != "state" {
		t.Errorf("regions %+v", regs)
	}
}
