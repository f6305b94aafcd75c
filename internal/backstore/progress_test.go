package backstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// goldenProgressInfo is the rollback of the worked example in format.go
// ("Rollback progress"): the golden store's geometry and UUID.
func goldenProgressInfo() ProgressInfo {
	return ProgressInfo{
		UUID: goldenUUID, ClusterSize: 4096, OriginSize: 64 << 10, Entries: 5,
		Started: time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC), Consume: true, Rate: 64 << 20,
	}
}

func noBefore() error { return nil }

// progressBytes creates a progress file for pi, marks cs, syncs, and
// returns the file's bytes.
func progressBytes(t testing.TB, pi ProgressInfo, cs ...uint32) []byte {
	t.Helper()
	fs := vfstest.NewMemFS()
	p, err := CreateProgress(openMem(t, fs, "progress"), pi)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		p.Mark(c)
	}
	if err := p.Sync(noBefore); err != nil {
		t.Fatal(err)
	}
	p.Close()
	b, err := fs.Contents("progress")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openProgressBytes opens b as a progress file.
func openProgressBytes(t testing.TB, b []byte) (*Progress, error) {
	t.Helper()
	f := openMem(t, vfstest.NewMemFS(), "progress")
	if len(b) > 0 {
		if _, err := f.WriteAt(b, 0); err != nil {
			t.Fatal(err)
		}
	}
	return OpenProgress(f)
}

// sameProgressInfo compares two infos, the rollback instant as an instant
// (OpenProgress decodes it in the local zone).
func sameProgressInfo(a, b ProgressInfo) bool {
	as, bs := a, b
	as.Started, bs.Started = time.Time{}, time.Time{}
	return as == bs && a.Started.Equal(b.Started)
}

// restoredSet is the set of clusters p marks restored, from its bitmap.
func restoredSet(p *Progress) map[uint32]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	got := map[uint32]bool{}
	for i, b := range p.bits {
		for b != 0 {
			got[uint32(i*8+bits.TrailingZeros8(b))] = true
			b &= b - 1
		}
	}
	return got
}

// TestOpenProgress covers OpenProgress on every kind of file: a fresh one,
// one with marks, the ones a crash before the commit point leaves
// (ErrNoProgress), damaged ones (ErrCorrupt) and a newer version
// (ErrVersion).
func TestOpenProgress(t *testing.T) {
	pi := goldenProgressInfo()

	t.Run("fresh", func(t *testing.T) {
		p, err := openProgressBytes(t, progressBytes(t, pi))
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		if !sameProgressInfo(p.Info(), pi) {
			t.Errorf("info %+v, want %+v", p.Info(), pi)
		}
		if p.Done() != 0 || p.Complete() || len(restoredSet(p)) != 0 {
			t.Errorf("fresh progress: done %d, complete %v, restored %v", p.Done(), p.Complete(), restoredSet(p))
		}
		for c := uint32(0); c < 20; c++ {
			if p.Restored(c) {
				t.Errorf("cluster %d restored in a fresh file", c)
			}
		}
	})

	t.Run("marks", func(t *testing.T) {
		fs := vfstest.NewMemFS()
		p, err := CreateProgress(openMem(t, fs, "progress"), pi)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []uint32{0, 3, 3, 15, 9, 16, 1 << 30} { // a repeat and two out of range
			p.Mark(c)
		}
		if p.Done() != 4 || p.Complete() || !p.Restored(15) || p.Restored(16) || p.Restored(1<<30) {
			t.Fatalf("in memory: done %d, complete %v, restored %v", p.Done(), p.Complete(), restoredSet(p))
		}
		if err := p.Sync(noBefore); err != nil {
			t.Fatal(err)
		}
		p.Close()
		// Only what was synced: reopen from a crash that keeps nothing else.
		c := fs.CrashClone(vfstest.CrashOptions{})
		p, err = OpenProgress(openMem(t, c, "progress"))
		if err != nil {
			t.Fatal(err)
		}
		want := map[uint32]bool{0: true, 3: true, 9: true, 15: true}
		if got := restoredSet(p); fmt.Sprint(got) != fmt.Sprint(want) || p.Done() != 4 || p.Complete() {
			t.Fatalf("after reopen: restored %v, done %d, complete %v; want %v", got, p.Done(), p.Complete(), want)
		}
		for c := range uint32(16) {
			if p.Restored(c) != want[c] {
				t.Errorf("Restored(%d) = %v", c, p.Restored(c))
			}
		}
		// The fifth mark completes the rollback, and survives a reopen.
		p.Mark(7)
		if !p.Complete() {
			t.Fatal("five of five marked, not complete")
		}
		if err := p.Sync(noBefore); err != nil {
			t.Fatal(err)
		}
		p.Close()
		p, err = OpenProgress(openMem(t, c.CrashClone(vfstest.CrashOptions{}), "progress"))
		if err != nil || !p.Complete() || p.Done() != 5 {
			t.Fatalf("complete rollback reopened: %v, done %d", err, p.Done())
		}
		p.Close()
	})

	t.Run("no entries", func(t *testing.T) {
		// A snapshot that copied nothing: complete from the start.
		empty := pi
		empty.Entries = 0
		p, err := openProgressBytes(t, progressBytes(t, empty))
		if err != nil || !p.Complete() || p.Done() != 0 {
			t.Fatalf("%v, complete %v", err, p != nil && p.Complete())
		}
	})

	t.Run("multi-page", func(t *testing.T) {
		// 100000 clusters: a bitmap of 12500 bytes, four pages (the last
		// partial), and a partial last byte.
		big := ProgressInfo{UUID: goldenUUID, ClusterSize: 512, OriginSize: 100000*512 - 3, Entries: 99999, Started: pi.Started}
		marks := []uint32{0, 7, 32767, 32768, 65535, 65536, 98303, 98304, 99999}
		b := progressBytes(t, big, marks...)
		if len(b) != progressHeaderSize+12500 {
			t.Fatalf("file is %d bytes", len(b))
		}
		p, err := openProgressBytes(t, b)
		if err != nil {
			t.Fatal(err)
		}
		if got := restoredSet(p); len(got) != len(marks) || p.Done() != uint32(len(marks)) {
			t.Fatalf("restored %v", got)
		}
		for _, c := range marks {
			if !p.Restored(c) {
				t.Errorf("cluster %d lost", c)
			}
		}
	})

	le := binary.LittleEndian
	good := progressBytes(t, pi, 3, 9)
	// 13 clusters: the bitmap's last byte has three bits past the origin.
	odd := pi
	odd.OriginSize = 13*4096 - 100
	oddGood := progressBytes(t, odd, 12)
	for _, tc := range []struct {
		name   string
		base   []byte
		change func(b []byte) []byte
		want   error
	}{
		{"empty file", good, func(b []byte) []byte { return nil }, ErrNoProgress},
		{"shorter than the header", good, func(b []byte) []byte { return b[:100] }, ErrNoProgress},
		{"one byte short of a header", good, func(b []byte) []byte { return b[:progressHeaderSize-1] }, ErrNoProgress},
		{"zero header", good, func(b []byte) []byte { clear(b[:progressHeaderSize]); return b }, ErrNoProgress},
		{"zero header, no bitmap", good, func(b []byte) []byte { return make([]byte, progressHeaderSize) }, ErrNoProgress},

		{"bad magic", good, func(b []byte) []byte { b[0] = 'X'; resealProgress(b); return b }, ErrCorrupt},
		{"a store's magic", good, func(b []byte) []byte { copy(b, headerMagic); resealProgress(b); return b }, ErrCorrupt},
		{"bad crc", good, func(b []byte) []byte { b[40] ^= 1; return b }, ErrCorrupt},
		{"bad crc, zero crc", good, func(b []byte) []byte { clear(b[progressCRCOff : progressCRCOff+4]); return b }, ErrCorrupt},
		{"version 0", good, func(b []byte) []byte { le.PutUint32(b[8:], 0); resealProgress(b); return b }, ErrCorrupt},
		{"reserved byte 52", good, func(b []byte) []byte { b[52] = 1; resealProgress(b); return b }, ErrCorrupt},
		{"reserved byte 72", good, func(b []byte) []byte { b[72] = 1; resealProgress(b); return b }, ErrCorrupt},
		{"reserved byte 507", good, func(b []byte) []byte { b[progressCRCOff-1] = 1; resealProgress(b); return b }, ErrCorrupt},
		{"reserved byte 4095", good, func(b []byte) []byte { b[progressHeaderSize-1] = 1; resealProgress(b); return b }, ErrCorrupt},
		{"reserved byte 4095", good, func(b []byte) []byte { b[progressHeaderSize-1] = 1; resealProgress(b); return b }, ErrCorrupt},
		{"unknown flag", good, func(b []byte) []byte { b[12] |= 2; resealProgress(b); return b }, ErrCorrupt},
		{"unknown high flag", good, func(b []byte) []byte { b[15] = 0x80; resealProgress(b); return b }, ErrCorrupt},
		{"cluster size 0", good, func(b []byte) []byte { le.PutUint32(b[32:], 0); resealProgress(b); return b }, ErrCorrupt},
		{"cluster size not a power of two", good, func(b []byte) []byte { le.PutUint32(b[32:], 4097); resealProgress(b); return b }, ErrCorrupt},
		{"cluster size too small", good, func(b []byte) []byte {
			le.PutUint32(b[32:], 256)
			le.PutUint32(b[36:], 256)
			resealProgress(b)
			return b
		}, ErrCorrupt},
		{"cluster size too big", good, func(b []byte) []byte {
			le.PutUint32(b[32:], 2<<20)
			le.PutUint32(b[36:], 1)
			resealProgress(b)
			return b
		}, ErrCorrupt},
		{"cluster count", good, func(b []byte) []byte { le.PutUint32(b[36:], 17); resealProgress(b); return b }, ErrCorrupt},
		{"origin size 0", good, func(b []byte) []byte {
			le.PutUint64(b[40:], 0)
			le.PutUint32(b[36:], 0)
			le.PutUint32(b[48:], 0)
			resealProgress(b)
			return b
		}, ErrCorrupt},
		{"negative origin size", good, func(b []byte) []byte { le.PutUint64(b[40:], 1<<63); resealProgress(b); return b }, ErrCorrupt},
		{"too many clusters", good, func(b []byte) []byte {
			le.PutUint64(b[40:], (MaxClusters+1)*4096)
			le.PutUint32(b[36:], MaxClusters+1)
			resealProgress(b)
			return b
		}, ErrCorrupt},
		// An origin size whose cluster count overflows int64 when rounded
		// up: with 4096-byte clusters, ceil((2^63-1)/4096) wraps to 1.
		{"origin size overflowing the cluster count", good, func(b []byte) []byte {
			le.PutUint64(b[40:], math.MaxInt64)
			le.PutUint32(b[36:], 1)
			le.PutUint32(b[48:], 1)
			resealProgress(b)
			b[progressHeaderSize] = 0
			return b[:progressHeaderSize+1]
		}, ErrCorrupt},
		{"entries > clusters", good, func(b []byte) []byte { le.PutUint32(b[48:], 17); resealProgress(b); return b }, ErrCorrupt},
		{"negative rate", good, func(b []byte) []byte { le.PutUint64(b[64:], 1<<63); resealProgress(b); return b }, ErrCorrupt},
		{"truncated bitmap", good, func(b []byte) []byte { return b[:len(b)-1] }, ErrCorrupt},
		{"no bitmap", good, func(b []byte) []byte { return b[:progressHeaderSize] }, ErrCorrupt},
		{"bit beyond the clusters", oddGood, func(b []byte) []byte { b[progressHeaderSize+1] |= 1 << 5; return b }, ErrCorrupt},
		{"last bit beyond the clusters", oddGood, func(b []byte) []byte { b[progressHeaderSize+1] |= 1 << 7; return b }, ErrCorrupt},
		{"more bits than entries", good, func(b []byte) []byte { b[progressHeaderSize] = 0x3f; return b }, ErrCorrupt},
		{"all bits, no entries", good, func(b []byte) []byte { le.PutUint32(b[48:], 0); resealProgress(b); return b }, ErrCorrupt},

		{"newer version", good, func(b []byte) []byte { le.PutUint32(b[8:], 2); resealProgress(b); return b }, ErrVersion},
		{"much newer version", good, func(b []byte) []byte { le.PutUint32(b[8:], 1<<31); resealProgress(b); return b }, ErrVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.change(bytes.Clone(tc.base))
			p, err := openProgressBytes(t, b)
			if err == nil {
				p.Close()
				t.Fatalf("opened: %+v, done %d; want %v", p.Info(), p.Done(), tc.want)
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("%v, want %v", err, tc.want)
			}
			for _, other := range []error{ErrNoProgress, ErrCorrupt, ErrVersion} {
				if other != tc.want && errors.Is(err, other) {
					t.Errorf("%v is also %v", err, other)
				}
			}
		})
	}
	// The bases themselves open.
	for _, b := range [][]byte{good, oddGood} {
		if p, err := openProgressBytes(t, b); err != nil {
			t.Fatal(err)
		} else {
			p.Close()
		}
	}
}

// TestCreateProgressOptions: CreateProgress refuses info it cannot record,
// with ErrOptions, and leaves the file alone.
func TestCreateProgressOptions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*ProgressInfo)
	}{
		{"cluster size 0", func(pi *ProgressInfo) { pi.ClusterSize = 0 }},
		{"cluster size too small", func(pi *ProgressInfo) { pi.ClusterSize = 256 }},
		{"cluster size too big", func(pi *ProgressInfo) { pi.ClusterSize = 2 << 20 }},
		{"cluster size not a power of two", func(pi *ProgressInfo) { pi.ClusterSize = 3000 }},
		{"negative cluster size", func(pi *ProgressInfo) { pi.ClusterSize = -4096 }},
		{"origin size 0", func(pi *ProgressInfo) { pi.OriginSize, pi.Entries = 0, 0 }},
		{"negative origin size", func(pi *ProgressInfo) { pi.OriginSize = -1 }},
		{"too many clusters", func(pi *ProgressInfo) { pi.OriginSize = (MaxClusters + 1) * 4096 }},
		{"origin size overflowing the cluster count", func(pi *ProgressInfo) { pi.OriginSize, pi.Entries = math.MaxInt64, 1 }},
		{"entries > clusters", func(pi *ProgressInfo) { pi.Entries = 17 }},
		{"negative rate", func(pi *ProgressInfo) { pi.Rate = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pi := goldenProgressInfo()
			tc.change(&pi)
			fs := vfstest.NewMemFS()
			f := openMem(t, fs, "progress")
			f.WriteAt([]byte("old contents"), 0)
			before := fs.MutationCount()
			p, err := CreateProgress(f, pi)
			if err == nil {
				p.Close()
				t.Fatalf("created: %d clusters", pi.Clusters())
			}
			if !errors.Is(err, ErrOptions) {
				t.Fatalf("%v, want ErrOptions", err)
			}
			if fs.MutationCount() != before {
				t.Error("refused CreateProgress changed the file")
			}
		})
	}
	// The limits themselves are fine.
	for _, pi := range []ProgressInfo{
		{ClusterSize: MinClusterSize, OriginSize: 1, Entries: 1},
		{ClusterSize: MaxClusterSize, OriginSize: MaxClusters * MaxClusterSize, Entries: MaxClusters},
	} {
		fs := vfstest.NewMemFS()
		p, err := CreateProgress(openMem(t, fs, "progress"), pi)
		if err != nil {
			t.Fatalf("%+v: %v", pi, err)
		}
		p.Close()
	}
}

// TestProgressGolden pins the progress format: the worked example's bytes
// (format.go, "Rollback progress") must not change (run with -update after
// a deliberate format change, and bump progressVersion), and the pinned
// file must keep opening.
func TestProgressGolden(t *testing.T) {
	path := filepath.Join("testdata", "progress-v1.golden")
	got := progressBytes(t, goldenProgressInfo(), 3, 9)
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
				t.Fatalf("progress bytes differ from %s first at offset %d (len %d vs %d): the format changed", path, i, len(got), len(want))
			}
		}
		t.Fatalf("progress file is %d bytes, %s is %d", len(got), path, len(want))
	}
	// The worked example's offsets and values.
	le := binary.LittleEndian
	if len(want) != progressHeaderSize+2 || string(want[0:8]) != "NBSROLLB" || le.Uint32(want[8:]) != 1 ||
		le.Uint32(want[12:]) != 1 || le.Uint32(want[36:]) != 16 || le.Uint32(want[48:]) != 5 ||
		le.Uint64(want[64:]) != 64<<20 || want[progressHeaderSize] != 0x08 || want[progressHeaderSize+1] != 0x02 {
		t.Fatal("golden file does not match the worked example's layout")
	}

	p, err := openProgressBytes(t, want)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if !sameProgressInfo(p.Info(), goldenProgressInfo()) {
		t.Errorf("golden info %+v", p.Info())
	}
	if got := restoredSet(p); len(got) != 2 || !got[3] || !got[9] || p.Done() != 2 || p.Complete() {
		t.Errorf("golden restored %v, done %d", got, p.Done())
	}
}

// TestProgressWorkedExample holds the hexdump in format.go ("Rollback
// progress", worked example) to the golden file it describes.
func TestProgressWorkedExample(t *testing.T) {
	src, err := os.ReadFile("format.go")
	if err != nil {
		t.Fatal(err)
	}
	golden, err := os.ReadFile(filepath.Join("testdata", "progress-v1.golden"))
	if err != nil {
		t.Fatal(err)
	}
	_, example, ok := strings.Cut(string(src), "Worked example (testdata/progress-v1.golden")
	if !ok {
		t.Fatal("format.go has no progress worked example")
	}
	example, _, _ = strings.Cut(example, "\n// #")
	lines := 0
	for _, l := range strings.Split(example, "\n") {
		l, ok := strings.CutPrefix(l, "//\t")
		if !ok {
			continue
		}
		fields := strings.Fields(l)
		off, err := strconv.ParseUint(fields[0], 16, 64)
		if err != nil {
			t.Fatalf("hexdump line %q: %v", l, err)
		}
		var want []byte
		for _, f := range fields[1:] {
			v, err := strconv.ParseUint(f, 16, 8)
			if len(f) != 2 || err != nil {
				break
			}
			want = append(want, byte(v))
		}
		if int(off)+len(want) > len(golden) || !bytes.Equal(golden[off:int(off)+len(want)], want) {
			t.Errorf("format.go shows % x at %#x; the golden file differs", want, off)
		}
		lines++
	}
	if lines < 7 {
		t.Fatalf("%d hexdump lines in the worked example", lines)
	}
}

// progressRun is the state of a progress workload at an instant.
type progressRun struct {
	created bool            // CreateProgress returned
	marked  map[uint32]bool // every Mark so far
	synced  map[uint32]bool // the marks made before a Sync that returned nil
	log     []string
}

func (r *progressRun) clone() *progressRun {
	c := &progressRun{created: r.created, marked: map[uint32]bool{}, synced: map[uint32]bool{}, log: r.log}
	for k := range r.marked {
		c.marked[k] = true
	}
	for k := range r.synced {
		c.synced[k] = true
	}
	return c
}

// crashProgressInfo: four bitmap pages, the last partial, and a partial last
// byte, so that a Sync writes several pages.
var crashProgressInfo = ProgressInfo{
	UUID: goldenUUID, ClusterSize: 512, OriginSize: 100000*512 - 3, Entries: 90000,
	Started: time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC),
}

// progressWorkload creates a progress file, then marks random clusters and
// syncs, several rounds (one with nothing marked), closing and reopening now
// and then. Before every mutating operation on fs it calls atOp with the
// workload's state at that instant.
func progressWorkload(t *testing.T, fs *vfstest.MemFS, seed uint64, atOp func(vfstest.Op, *progressRun)) {
	r := rand.New(rand.NewPCG(seed, 7))
	run := &progressRun{marked: map[uint32]bool{}, synced: map[uint32]bool{}}
	fs.OnOp(func(op vfstest.Op) { atOp(op, run) })
	defer fs.OnOp(nil)
	p, err := CreateProgress(openMem(t, fs, "progress"), crashProgressInfo)
	if err != nil {
		t.Fatal(err)
	}
	run.created = true
	for round := range 8 {
		n := r.IntN(300)
		if round == 2 {
			n = 0
		}
		for range n {
			// A repeated cluster is marked twice, which Mark ignores.
			c := uint32(r.IntN(int(crashProgressInfo.Clusters())))
			p.Mark(c)
			run.marked[c] = true
		}
		run.log = append(run.log, fmt.Sprintf("mark %d, sync", n))
		covered := run.clone().marked
		if err := p.Sync(noBefore); err != nil {
			t.Fatal(err)
		}
		run.synced = covered
		if r.IntN(3) == 0 {
			run.log = append(run.log, "reopen")
			p.Close()
			if p, err = OpenProgress(openMem(t, fs, "progress")); err != nil {
				t.Fatal(err)
			}
		}
	}
	p.Close()
}

// verifyProgressCrash opens the progress file a crash left and checks it
// against the workload's state at the crash.
func verifyProgressCrash(t *testing.T, c *vfstest.MemFS, run *progressRun) error {
	p, err := OpenProgress(openMem(t, c, "progress"))
	if errors.Is(err, ErrNoProgress) && !run.created {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open (CreateProgress returned: %v): %w", run.created, err)
	}
	defer p.Close()
	if !sameProgressInfo(p.Info(), crashProgressInfo) {
		return fmt.Errorf("info %+v", p.Info())
	}
	got := restoredSet(p)
	for cl := range run.synced {
		if !got[cl] {
			return fmt.Errorf("cluster %d of a completed Sync not restored (%d restored, %d synced)", cl, len(got), len(run.synced))
		}
	}
	for cl := range got {
		if !run.marked[cl] {
			return fmt.Errorf("cluster %d restored, never marked", cl)
		}
	}
	if p.Done() != uint32(len(got)) {
		return fmt.Errorf("done %d, %d bits set", p.Done(), len(got))
	}
	return nil
}

// TestProgressCrash crashes the progress workload immediately before each of
// its mutating operations (MemFS.CrashAt, rerunning the workload for every
// k until it no longer reaches k). After every crash OpenProgress must say
// ErrNoProgress — only before CreateProgress returned — or open with a
// restored set between what the completed Syncs covered and what was
// marked; never ErrCorrupt. Three flavours of crash as in
// TestCrashAtEveryWrite: only synced data survives; a random part of the
// unsynced writes survives too; and those may be torn at 512-byte sectors.
func TestProgressCrash(t *testing.T) {
	modes := []struct {
		name string
		opts func(r *rand.Rand) vfstest.CrashOptions
	}{
		{"synced-only", func(*rand.Rand) vfstest.CrashOptions { return vfstest.CrashOptions{} }},
		{"random-unsynced", func(r *rand.Rand) vfstest.CrashOptions { return vfstest.CrashOptions{Rand: r} }},
		{"torn", func(r *rand.Rand) vfstest.CrashOptions {
			return vfstest.CrashOptions{Rand: r, TornWrites: true, KeepProbability: 0.6}
		}},
	}
	seeds := uint64(6)
	if testing.Short() {
		seeds = 2
	}
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			failures := 0
			for seed := range seeds {
				points := 0
				for k := int64(1); ; k++ {
					fs := vfstest.NewMemFS()
					fs.CrashAt(k, mode.opts(rand.New(rand.NewPCG(seed, uint64(k)))))
					var at *progressRun
					var atOp vfstest.Op
					progressWorkload(t, fs, seed, func(op vfstest.Op, run *progressRun) {
						if op.Seq == k {
							at, atOp = run.clone(), op
						}
					})
					c := fs.Crashed()
					if c == nil {
						break
					}
					points++
					if err := verifyProgressCrash(t, c, at); err != nil {
						t.Errorf("seed %d, crash before op %v: %v\nworkload so far: %v", seed, atOp, err, at.log)
						if failures++; failures >= 5 {
							t.FailNow()
						}
					}
				}
				if points < 20 {
					t.Fatalf("seed %d: only %d crash points", seed, points)
				}
			}
		})
	}
}

// TestCreateProgressCrash crashes CreateProgress before each of its
// mutating operations, keeping many random subsets of the unsynced ones
// (whole: TestProgressTornHeaderWrite tears them): the file must read as no
// rollback, or as the new rollback with nothing restored.
func TestCreateProgressCrash(t *testing.T) {
	for k := int64(1); ; k++ {
		reached := false
		for seed := range uint64(64) {
			fs := vfstest.NewMemFS()
			fs.CrashAt(k, vfstest.CrashOptions{Rand: newRand(seed)})
			p, err := CreateProgress(openMem(t, fs, "progress"), crashProgressInfo)
			if err != nil {
				t.Fatal(err)
			}
			p.Close()
			c := fs.Crashed()
			if c == nil {
				break
			}
			reached = true
			if err := verifyProgressCrash(t, c, &progressRun{}); err != nil {
				t.Fatalf("crash before op %d (seed %d): %v", k, seed, err)
			}
		}
		if !reached {
			if k < 4 {
				t.Fatalf("CreateProgress made only %d mutating operations", k-1)
			}
			return
		}
	}
}

// TestProgressTornPage tears a Sync's page writes at every 512-byte sector
// (MemFS TornWrites): whatever survives opens, holds every mark of the
// earlier Sync, and no bit that was not marked.
func TestProgressTornPage(t *testing.T) {
	fs := vfstest.NewMemFS()
	p, err := CreateProgress(openMem(t, fs, "progress"), crashProgressInfo)
	if err != nil {
		t.Fatal(err)
	}
	// Old bits in every sector of pages 0 and 1, then new bits in every
	// sector next to them: a torn write mixes the two sector by sector.
	old, marked := map[uint32]bool{}, map[uint32]bool{}
	for c := uint32(0); c < 2*progressPage*8; c += 512 {
		p.Mark(c)
		old[c], marked[c] = true, true
	}
	if err := p.Sync(noBefore); err != nil {
		t.Fatal(err)
	}
	for c := uint32(1); c < 2*progressPage*8; c += 512 {
		p.Mark(c)
		marked[c] = true
	}
	var clones []*vfstest.MemFS
	fs.OnOp(func(op vfstest.Op) {
		if op.Kind == vfstest.OpSync {
			for seed := range uint64(64) {
				clones = append(clones, fs.CrashClone(vfstest.CrashOptions{Rand: newRand(seed), TornWrites: true, KeepProbability: 0.5}))
			}
		}
	})
	if err := p.Sync(noBefore); err != nil {
		t.Fatal(err)
	}
	fs.OnOp(nil)
	if len(clones) == 0 {
		t.Fatal("no crash taken during the Sync")
	}
	torn := 0
	for i, c := range clones {
		run := &progressRun{created: true, marked: marked, synced: old}
		if err := verifyProgressCrash(t, c, run); err != nil {
			t.Fatalf("clone %d: %v", i, err)
		}
		p2, _ := OpenProgress(openMem(t, c, "progress"))
		if n := len(restoredSet(p2)); n != len(old) && n != len(marked) {
			torn++
		}
		p2.Close()
	}
	if torn == 0 {
		t.Error("no clone held a torn page: the test tested nothing")
	}

	// The same by hand: the first half of page 0 new, the rest old.
	b, _ := fs.Contents("progress")
	before := progressBytes(t, crashProgressInfo, keys(old)...)
	half := bytes.Clone(before)
	copy(half[progressHeaderSize:progressHeaderSize+progressPage/2], b[progressHeaderSize:])
	p3, err := openProgressBytes(t, half)
	if err != nil {
		t.Fatal(err)
	}
	defer p3.Close()
	if err := verifyProgressCrash(t, mustFS(t, half), &progressRun{created: true, marked: marked, synced: old}); err != nil {
		t.Fatal(err)
	}
	if n := p3.Done(); n <= uint32(len(old)) || n >= uint32(len(marked)) {
		t.Errorf("half a page new: %d done, want between %d and %d", n, len(old), len(marked))
	}
}

// TestProgressTornHeaderWrite: CreateProgress's header write is its commit
// point, and a crash during it may tear it at sectors like any other write
// (as the format's own argument for bitmap pages assumes). Every mix of old
// (zero) and new sectors of the header must read as "no rollback" or as
// the rollback — never as damage, which a crash cannot cause.
func TestProgressTornHeaderWrite(t *testing.T) {
	zero := make([]byte, progressHeaderSize+2)
	created := progressBytes(t, goldenProgressInfo())
	const sectors = progressHeaderSize / 512
	bad := 0
	for mask := range 1 << sectors {
		b := bytes.Clone(zero)
		for s := range sectors {
			if mask&(1<<s) != 0 {
				copy(b[s*512:(s+1)*512], created[s*512:])
			}
		}
		p, err := openProgressBytes(t, b)
		switch {
		case err == nil:
			p.Close()
		case errors.Is(err, ErrNoProgress):
		default:
			if bad++; bad <= 2 {
				t.Errorf("header sectors %08b written of %d: %v", mask, sectors, err)
			}
		}
	}
	if bad > 2 {
		t.Errorf("... %d torn headers of %d fail to open", bad, 1<<sectors)
	}
}

func keys(m map[uint32]bool) []uint32 {
	var ks []uint32
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// mustFS is a MemFS holding b, synced, as "progress".
func mustFS(t *testing.T, b []byte) *vfstest.MemFS {
	fs := vfstest.NewMemFS()
	f := openMem(t, fs, "progress")
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return fs
}

// durableRestored is the restored set of what a crash now would leave of
// fs's "progress" (synced data only).
func durableRestored(t *testing.T, fs *vfstest.MemFS) map[uint32]bool {
	t.Helper()
	p, err := OpenProgress(openMem(t, fs.CrashClone(vfstest.CrashOptions{}), "progress"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	return restoredSet(p)
}

// TestProgressSyncBefore pins Sync's before callback: it runs on every
// Sync, before anything is written; its error fails the Sync and leaves the
// marks to the next one; marks made while it runs are not written by that
// Sync (the origin sync in before did not cover them).
func TestProgressSyncBefore(t *testing.T) {
	fs := vfstest.NewMemFS()
	p, err := CreateProgress(openMem(t, fs, "progress"), crashProgressInfo)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var events []string
	fs.OnOp(func(op vfstest.Op) { events = append(events, op.Kind.String()) })
	defer fs.OnOp(nil)
	calls := 0
	before := func() error { calls++; events = append(events, "before"); return nil }

	// Nothing dirty: before runs all the same, and nothing is written.
	for range 3 {
		if err := p.Sync(before); err != nil {
			t.Fatal(err)
		}
	}
	if calls != 3 || fmt.Sprint(events) != "[before before before]" {
		t.Fatalf("clean Syncs: %d calls, events %v", calls, events)
	}

	// Dirty pages: before, then the writes, then one sync.
	events = nil
	p.Mark(1)
	p.Mark(40000) // page 1
	if err := p.Sync(before); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(events) != "[before write write sync]" {
		t.Fatalf("events %v", events)
	}
	if got := durableRestored(t, fs); len(got) != 2 || !got[1] || !got[40000] {
		t.Fatalf("durable %v", got)
	}

	// before fails: nothing is written, the Sync fails with its error, and
	// the marks wait for the next Sync.
	errOrigin := errors.New("origin sync failed")
	events = nil
	p.Mark(2)
	p.Mark(70000)
	if err := p.Sync(func() error { events = append(events, "before"); return errOrigin }); !errors.Is(err, errOrigin) {
		t.Fatalf("Sync with a failing before: %v", err)
	}
	if fmt.Sprint(events) != "[before]" {
		t.Fatalf("a failing before was followed by %v", events)
	}
	if got := durableRestored(t, fs); len(got) != 2 {
		t.Fatalf("durable after a failed Sync: %v", got)
	}
	if !p.Restored(2) || p.Done() != 4 {
		t.Fatal("a failed Sync dropped marks from memory")
	}
	events = nil
	if err := p.Sync(before); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(events) != "[before write write sync]" {
		t.Fatalf("Sync after a failed one: events %v", events)
	}
	if got := durableRestored(t, fs); len(got) != 4 || !got[2] || !got[70000] {
		t.Fatalf("durable after the retry %v", got)
	}

	// A mark made while before runs (same page as one made before it):
	// not written by this Sync, written by the next.
	p.Mark(3)
	if err := p.Sync(func() error { p.Mark(4); p.Mark(80000); return nil }); err != nil {
		t.Fatal(err)
	}
	if got := durableRestored(t, fs); !got[3] || got[4] || got[80000] {
		t.Fatalf("durable %v: want 3, not 4 or 80000 (marked during before)", got)
	}
	if err := p.Sync(noBefore); err != nil {
		t.Fatal(err)
	}
	if got := durableRestored(t, fs); !got[4] || !got[80000] || len(got) != 7 {
		t.Fatalf("durable %v: marks made during before lost", got)
	}
}

// TestProgressSyncFault: a failed write or sync of the progress file fails
// Sync with the file system's error and leaves the marks to the next Sync,
// which writes them again.
func TestProgressSyncFault(t *testing.T) {
	for _, tc := range []struct {
		name string
		rule vfstest.Rule
	}{
		{"write EIO", vfstest.Rule{Kind: vfstest.OpWrite}},
		{"second write EIO", vfstest.Rule{Kind: vfstest.OpWrite, Nth: 2}},
		{"short write ENOSPC", vfstest.Rule{Kind: vfstest.OpWrite, Err: syscall.ENOSPC, Partial: true}},
		{"sync EIO", vfstest.Rule{Kind: vfstest.OpSync}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfstest.NewMemFS()
			ff := vfstest.NewFaultFS(mem)
			f, err := ff.OpenFile("progress", os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			p, err := CreateProgress(f, crashProgressInfo)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			p.Mark(10)
			if err := p.Sync(noBefore); err != nil {
				t.Fatal(err)
			}
			errno := tc.rule.Err
			if errno == 0 {
				errno = syscall.EIO
			}
			marks := []uint32{11, 12, 40000, 80000} // three pages
			for _, c := range marks {
				p.Mark(c)
			}
			ff.Inject(tc.rule)
			if err := p.Sync(noBefore); !errors.Is(err, errno) {
				t.Fatalf("Sync under %s: %v, want %v", tc.name, err, errno)
			}
			if ff.Injected() != 1 {
				t.Fatalf("%d faults fired", ff.Injected())
			}
			// Whatever a crash keeps now is still a valid, monotone file.
			for seed := range uint64(8) {
				c := mem.CrashClone(vfstest.CrashOptions{Rand: newRand(seed), TornWrites: true})
				run := &progressRun{created: true, marked: map[uint32]bool{10: true}, synced: map[uint32]bool{10: true}}
				for _, m := range marks {
					run.marked[m] = true
				}
				if err := verifyProgressCrash(t, c, run); err != nil {
					t.Fatalf("crash after the failed Sync: %v", err)
				}
			}
			writes := ff.Count(vfstest.OpWrite)
			if err := p.Sync(noBefore); err != nil {
				t.Fatalf("Sync after the fault: %v", err)
			}
			if n := ff.Count(vfstest.OpWrite) - writes; n != 3 {
				t.Errorf("the retry wrote %d pages, want all 3 again", n)
			}
			if got := durableRestored(t, mem); len(got) != 5 {
				t.Fatalf("durable after the retry: %v", got)
			}
		})
	}
}

// TestProgressConcurrent marks and syncs from several goroutines (for the
// race detector); every mark made before the last Sync is durable.
func TestProgressConcurrent(t *testing.T) {
	fs := vfstest.NewMemFS()
	p, err := CreateProgress(openMem(t, fs, "progress"), crashProgressInfo)
	if err != nil {
		t.Fatal(err)
	}
	const workers, each = 4, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				c := uint32((i*workers + w) * 11 % 99000)
				p.Mark(c)
				_ = p.Restored(c)
				if i%97 == 0 {
					if err := p.Sync(noBefore); err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	if err := p.Sync(noBefore); err != nil {
		t.Fatal(err)
	}
	if p.Done() != workers*each {
		t.Fatalf("done %d", p.Done())
	}
	p.Close()
	if got := durableRestored(t, fs); len(got) != workers*each {
		t.Fatalf("%d durable, want %d", len(got), workers*each)
	}
}

// resealProgress recomputes a progress header's CRC after a test changed it.
func resealProgress(b []byte) {
	binary.LittleEndian.PutUint32(b[progressCRCOff:], checksum(b[:progressCRCOff]))
}
