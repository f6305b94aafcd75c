package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/nbdsnap/nbdsnap/test/powerloss/workload"
)

// scenarioPowerLoss runs each recording the host attached disks for (see
// test/vm/powerloss_test.go): it finds the recording's three virtio disks
// by serial number (nbdsnap-pl-N-data, -log, -record), reads its spec from
// the record disk, puts a dm-log-writes device over the data disk logging
// to the log disk, lays out the origin, the backing stores and the state
// directory on it, serves the origin, runs the workload through /dev/nbd0
// and writes what it did back to the record disk. The checks happen on the
// host, replaying the log.
func scenarioPowerLoss(ctx context.Context, g *guest) error {
	disks, err := recordingDisks()
	if err != nil {
		return err
	}
	if len(disks) == 0 {
		return fmt.Errorf("no disk with serial nbdsnap-pl-N-record: the host attached no recording")
	}
	// Dirty pages reach the disk within 0.1 s instead of 30 s, so that a
	// buffered write issued too early (before the store commit that must
	// precede it) shows on the disk before the next flush, as it may on a
	// busy machine, instead of waiting for a sync that would hide it.
	for name, v := range map[string]string{"dirty_writeback_centisecs": "10", "dirty_expire_centisecs": "10"} {
		if err := os.WriteFile("/proc/sys/vm/"+name, []byte(v), 0o644); err != nil {
			return err
		}
	}
	for _, d := range disks {
		spec, err := readSpec(d.record)
		if err != nil {
			return err
		}
		rec, err := g.record(ctx, spec, d)
		if err != nil {
			return fmt.Errorf("recording %s: %w", spec.Name(), err)
		}
		if err := g.step(spec.Name()+": write the record", func() error { return writeRecord(d.record, rec) }); err != nil {
			return err
		}
	}
	return nil
}

// plDisks are one recording's devices.
type plDisks struct {
	index             int
	data, log, record string
}

// recordingDisks finds the virtio disks by the serial numbers the host gave
// them, in recording order.
func recordingDisks() ([]plDisks, error) {
	byIndex := map[int]*plDisks{}
	entries, _ := filepath.Glob("/sys/block/vd*/serial")
	for _, e := range entries {
		serial, err := os.ReadFile(e)
		if err != nil {
			return nil, err
		}
		f := strings.Split(strings.TrimSpace(string(serial)), "-")
		if len(f) != 4 || f[0] != "nbdsnap" || f[1] != "pl" {
			continue
		}
		i, err := strconv.Atoi(f[2])
		if err != nil {
			return nil, fmt.Errorf("%s: serial %q", e, serial)
		}
		if byIndex[i] == nil {
			byIndex[i] = &plDisks{index: i}
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(e))
		switch f[3] {
		case "data":
			byIndex[i].data = dev
		case "log":
			byIndex[i].log = dev
		case "record":
			byIndex[i].record = dev
		}
	}
	var out []plDisks
	for i := range len(byIndex) {
		d := byIndex[i]
		if d == nil || d.data == "" || d.log == "" || d.record == "" {
			return nil, fmt.Errorf("recording %d: missing one of its data, log and record disks", i)
		}
		out = append(out, *d)
	}
	return out, nil
}

func readSpec(dev string) (workload.Spec, error) {
	var spec workload.Spec
	f, err := os.Open(dev)
	if err != nil {
		return spec, err
	}
	defer f.Close()
	b, err := workload.ReadDoc(f, workload.SpecOffset)
	if err != nil {
		return spec, fmt.Errorf("%s: spec: %w", dev, err)
	}
	if err := json.Unmarshal(b, &spec); err != nil {
		return spec, fmt.Errorf("%s: spec: %w", dev, err)
	}
	return spec, nil
}

func writeRecord(dev string, rec *workload.Record) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := workload.WriteDoc(f, workload.RecordOffset, b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// plLayout is where a recording's origin, stores and state live.
type plLayout struct {
	origin   string
	state    string
	backing  map[string]string // snapshot name -> path
	mounts   []string          // to unmount at the end, innermost last
	dmNames  []string          // to remove at the end, the log last
	logDev   string            // the dm-log-writes device's name, for marks
	dataSize int64
}

// dm runs dmsetup without udev (there is none in the guest): libdevmapper
// then makes the /dev/mapper nodes itself.
func (g *guest) dm(ctx context.Context, args ...string) error {
	_, err := g.run(ctx, "env", append([]string{"DM_DISABLE_UDEV=1", "dmsetup", "--noudevsync"}, args...)...)
	return err
}

// mark adds a dm-log-writes mark: it lands in the log after every write
// completed before it.
func (g *guest) mark(ctx context.Context, l *plLayout, text string) error {
	return g.dm(ctx, "message", l.logDev, "0", "mark", text)
}

func sectors(size int64) string { return strconv.FormatInt(size/512, 10) }

// setUp puts dm-log-writes over the data disk and lays the recording out on
// it. Everything written from here on is in the log, mkfs included, so a
// replay starts from a zeroed disk.
func (g *guest) setUp(ctx context.Context, spec workload.Spec, d plDisks) (*plLayout, error) {
	size, err := deviceSize(d.data)
	if err != nil {
		return nil, err
	}
	l := &plLayout{logDev: fmt.Sprintf("pl%d-log", spec.Index), dataSize: size, backing: map[string]string{}}
	if err := g.dm(ctx, "create", l.logDev, "--table", "0 "+sectors(size)+" log-writes "+d.data+" "+d.log); err != nil {
		return nil, err
	}
	l.dmNames = append(l.dmNames, l.logDev)
	logged := "/dev/mapper/" + l.logDev
	mkfs := func(dev string) error {
		_, err := g.run(ctx, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev)
		return err
	}
	switch spec.Layout {
	case workload.LayoutRaw:
		// The daemon sees the origin and the stores through links under
		// Root, which the host recreates pointing at its own devices.
		devDir := filepath.Join(spec.Root, "dev")
		if err := os.MkdirAll(devDir, 0o755); err != nil {
			return nil, err
		}
		for _, r := range workload.RawRegions(spec.OriginSize) {
			if r.Offset+r.Size > size {
				return nil, fmt.Errorf("data disk %s: %d bytes, too small for the raw layout", d.data, size)
			}
			name := fmt.Sprintf("pl%d-%s", spec.Index, r.Name)
			if err := g.dm(ctx, "create", name, "--table", "0 "+sectors(r.Size)+" linear "+logged+" "+sectors(r.Offset)); err != nil {
				return nil, err
			}
			l.dmNames = slices.Insert(l.dmNames, 0, name)
			link := filepath.Join(devDir, r.Name)
			if err := os.Symlink("/dev/mapper/"+name, link); err != nil {
				return nil, err
			}
			switch r.Name {
			case "origin":
				l.origin = link
			case "state":
				if err := mkfs(link); err != nil {
					return nil, err
				}
				mnt := filepath.Join(spec.Root, "statefs")
				if err := g.mount(ctx, link, mnt, "rw"); err != nil {
					return nil, err
				}
				l.mounts = append(l.mounts, mnt)
				l.state = filepath.Join(mnt, "state")
			default:
				l.backing[r.Name] = link
			}
		}
	case workload.LayoutFile:
		if err := mkfs(logged); err != nil {
			return nil, err
		}
		mnt := filepath.Join(spec.Root, "fs")
		if err := g.mount(ctx, logged, mnt, "rw"); err != nil {
			return nil, err
		}
		l.mounts = append(l.mounts, mnt)
		l.origin = filepath.Join(mnt, "origin.img")
		l.state = filepath.Join(mnt, "state")
		if err := os.MkdirAll(filepath.Join(mnt, "stores"), 0o755); err != nil {
			return nil, err
		}
		for _, s := range []string{"snap1", "snap2"} {
			l.backing[s] = filepath.Join(mnt, "stores", s+".cow")
		}
		// A sparse origin: the workload's first writes allocate its blocks,
		// so fdatasync on the origin commits ext4 metadata too.
		f, err := os.OpenFile(l.origin, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		if err := f.Truncate(spec.OriginSize); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown layout %q", spec.Layout)
	}
	return l, nil
}

// tearDown unmounts and removes what setUp made, the log device last: its
// removal writes the log's final super block.
func (g *guest) tearDown(ctx context.Context, l *plLayout) error {
	if err := g.mark(ctx, l, "end"); err != nil {
		return err
	}
	for i := len(l.mounts) - 1; i >= 0; i-- {
		if err := g.umount(ctx, l.mounts[i]); err != nil {
			return err
		}
	}
	for _, name := range l.dmNames {
		if err := g.dm(ctx, "remove", name); err != nil {
			return err
		}
	}
	return nil
}

func deviceSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.Seek(0, io.SeekEnd)
}

// record runs one recording and returns what its workload did.
func (g *guest) record(ctx context.Context, spec workload.Spec, d plDisks) (*workload.Record, error) {
	name := spec.Name()
	var l *plLayout
	if err := g.step(name+": dm-log-writes + layout", func() (err error) { l, err = g.setUp(ctx, spec, d); return err }); err != nil {
		return nil, err
	}
	var daemon *proc
	if err := g.step(name+": serve + attach", func() (err error) {
		if daemon, err = g.serveOrigin(ctx, l.origin, l.state); err != nil {
			return err
		}
		if err := g.mark(ctx, l, workload.FirstMark); err != nil {
			return err
		}
		return g.attach(ctx, nbd0, serveSock, exportName)
	}); err != nil {
		return nil, err
	}
	w := &plWorkload{g: g, spec: spec, layout: l,
		rec: &workload.Record{Spec: spec, Backing: l.backing, Origin: l.origin, State: l.state}}
	var run func(context.Context) error
	switch spec.Workload {
	case workload.Random:
		run = w.random
	case workload.Ext4:
		run = w.ext4
	default:
		return nil, fmt.Errorf("unknown workload %q", spec.Workload)
	}
	if err := g.step(name+": workload", func() error { return run(ctx) }); err != nil {
		return nil, err
	}
	if err := g.step(name+": detach + stop + tear down", func() error {
		if err := g.detach(ctx, nbd0); err != nil {
			return err
		}
		if err := daemon.stop(ctx); err != nil {
			return err
		}
		return g.tearDown(ctx, l)
	}); err != nil {
		return nil, err
	}
	g.log.Info("recorded", "recording", name, "events", len(w.rec.Events))
	return w.rec, nil
}

// plWorkload runs a workload and keeps its record. Events are appended
// under mu in the order they happen.
type plWorkload struct {
	g      *guest
	spec   workload.Spec
	layout *plLayout

	mu  sync.Mutex
	rec *workload.Record
}

func (w *plWorkload) event(e workload.Event) {
	w.mu.Lock()
	w.rec.Events = append(w.rec.Events, e)
	w.mu.Unlock()
}

// marked records an event and then adds its mark, so that the mark is in
// the log after everything the event covers.
func (w *plWorkload) marked(ctx context.Context, e workload.Event) error {
	w.event(e)
	return w.g.mark(ctx, w.layout, e.Mark)
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[off : off+n]
}

// hashDevice reads a whole device with O_DIRECT (past the guest's page
// cache, so that what is hashed is what the server returns) and returns
// its sha256.
func hashDevice(dev string) (string, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	buf := alignedBuf(1 << 20)
	for off := int64(0); ; {
		n, err := f.ReadAt(buf, off)
		h.Write(buf[:n])
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// createSnapshot takes snapshot name with the origin quiet (quiesce stops
// the writers or freezes the file system and undoes it after): the hash of
// /dev/nbd0 taken then is the image the snapshot must hold.
func (w *plWorkload) createSnapshot(ctx context.Context, name string) error {
	hash, err := hashDevice(nbd0)
	if err != nil {
		return err
	}
	if err := w.marked(ctx, workload.Event{Kind: workload.KindCreate, Name: name, Hash: hash, Mark: "create-" + name}); err != nil {
		return err
	}
	if _, err := w.g.nbdsnap(ctx, "create", name, "--backing", w.layout.backing[name], "--cluster-size", w.spec.ClusterSize); err != nil {
		return err
	}
	return w.marked(ctx, workload.Event{Kind: workload.KindCreated, Name: name, Mark: "created-" + name})
}

func (w *plWorkload) clearSnapshot(ctx context.Context, name string) error {
	if err := w.marked(ctx, workload.Event{Kind: workload.KindClear, Name: name, Mark: "clear-" + name}); err != nil {
		return err
	}
	if _, err := w.g.nbdsnap(ctx, "clear", name); err != nil {
		return err
	}
	return w.marked(ctx, workload.Event{Kind: workload.KindCleared, Name: name, Mark: "cleared-" + name})
}

// The random workload's shape: four writers, each owning every fourth run
// of chunkBlocks blocks, so that a 64K cluster is shared by all four while
// no two writers ever write the same block (which keeps "acknowledged in
// seq order" true per block); an fsync every syncEvery writes; one write in
// fuaOneIn with O_DSYNC, which the kernel sends as a FUA write.
const (
	plWriters      = 4
	chunkBlocks    = 4
	writesPerPhase = 160
	syncEvery      = 24
	fuaOneIn       = 8
)

// random writes identified blocks (workload.Block) through /dev/nbd0 with
// O_DIRECT in four phases: before any snapshot, after snap1, after snap2,
// and after snap1 is cleared, which happens while the writers run. Creates
// stop the writers, so that the origin at the create instant is known.
func (w *plWorkload) random(ctx context.Context) error {
	plain, err := os.OpenFile(nbd0, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer plain.Close()
	fua, err := os.OpenFile(nbd0, os.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC, 0)
	if err != nil {
		return err
	}
	defer fua.Close()
	blocks := w.spec.OriginSize / workload.BlockSize
	var seq, writes, syncs atomic.Int64
	writer := func(id int, n int, r *rand.Rand) error {
		buf := alignedBuf(chunkBlocks * workload.BlockSize)
		for range n {
			chunk := int64(r.IntN(int(blocks/chunkBlocks/plWriters)))*plWriters + int64(id)
			start := r.Int64N(chunkBlocks)
			count := 1 + r.Int64N(chunkBlocks-start)
			block := chunk*chunkBlocks + start
			isFUA := r.IntN(fuaOneIn) == 0
			s := seq.Add(1)
			for i := range count {
				workload.Block(buf[i*workload.BlockSize:(i+1)*workload.BlockSize], w.spec.Seed, block+i, s)
			}
			w.event(workload.Event{Kind: workload.KindWrite, Seq: s, Block: block, Count: count, FUA: isFUA})
			f := plain
			if isFUA {
				f = fua
			}
			if _, err := f.WriteAt(buf[:count*workload.BlockSize], block*workload.BlockSize); err != nil {
				return fmt.Errorf("write %d (blocks %d+%d): %w", s, block, count, err)
			}
			done := workload.Event{Kind: workload.KindDone, Seq: s}
			if isFUA {
				done.Mark = "fua-" + strconv.FormatInt(s, 10)
				if err := w.marked(ctx, done); err != nil {
					return err
				}
			} else {
				w.event(done)
			}
			if writes.Add(1)%syncEvery == 0 {
				id := int(syncs.Add(1))
				w.event(workload.Event{Kind: workload.KindSync, ID: id})
				if err := plain.Sync(); err != nil {
					return fmt.Errorf("fsync %d: %w", id, err)
				}
				if err := w.marked(ctx, workload.Event{Kind: workload.KindSynced, ID: id, Mark: "sync-" + strconv.Itoa(id)}); err != nil {
					return err
				}
			}
		}
		return nil
	}
	phase := func(p int, during func() error) error {
		errs := make(chan error, plWriters+1)
		for id := range plWriters {
			r := rand.New(rand.NewPCG(w.spec.Seed, uint64(p*plWriters+id)))
			go func() { errs <- writer(id, writesPerPhase/plWriters, r) }()
		}
		var first error
		if during != nil {
			first = during()
		}
		for range plWriters {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		return first
	}
	steps := []struct {
		name string
		fn   func() error
	}{
		{"writes, no snapshot", func() error { return phase(0, nil) }},
		{"create snap1", func() error { return w.createSnapshot(ctx, "snap1") }},
		{"writes under snap1", func() error { return phase(1, nil) }},
		{"create snap2", func() error { return w.createSnapshot(ctx, "snap2") }},
		{"writes under snap1+2, clear snap1 among them", func() error {
			return phase(2, func() error { return w.clearSnapshot(ctx, "snap1") })
		}},
		{"writes under snap2", func() error { return phase(3, nil) }},
	}
	for _, s := range steps {
		if err := w.g.step(w.spec.Name()+": "+s.name, s.fn); err != nil {
			return err
		}
	}
	return nil
}

// ext4 makes ext4 on the origin and runs rounds of file creates and deletes,
// each ending with sync(2), with snapshots taken under FIFREEZE.
func (w *plWorkload) ext4(ctx context.Context) error {
	const mnt = originMnt
	if err := w.g.step(w.spec.Name()+": mkfs.ext4 + mount", func() error {
		if _, err := w.g.run(ctx, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", nbd0); err != nil {
			return err
		}
		return w.g.mount(ctx, nbd0, mnt, "rw")
	}); err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(w.spec.Seed, 1))
	tree := map[string]string{} // path -> sha256, what the file system holds
	syncs := 0
	round := func(n int) error {
		for i := range 8 {
			rel := fmt.Sprintf("r%02d/f%d", n, i)
			data := make([]byte, 1+r.IntN(160<<10))
			for j := range data {
				data[j] = byte(r.Uint32())
			}
			if err := os.MkdirAll(filepath.Join(mnt, filepath.Dir(rel)), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(mnt, rel), data, 0o644); err != nil {
				return err
			}
			tree[rel] = workload.HashBytes(data)
		}
		// Delete three files of earlier rounds.
		var old []string
		for p := range tree {
			if !strings.HasPrefix(p, fmt.Sprintf("r%02d/", n)) {
				old = append(old, p)
			}
		}
		slices.Sort(old)
		for i := 0; i < 3 && len(old) > 0; i++ {
			k := r.IntN(len(old))
			if err := os.Remove(filepath.Join(mnt, old[k])); err != nil {
				return err
			}
			delete(tree, old[k])
			w.event(workload.Event{Kind: workload.KindDelete, Path: old[k]})
			old = slices.Delete(old, k, k+1)
		}
		syncs++
		w.event(workload.Event{Kind: workload.KindSync, ID: syncs, Files: maps.Clone(tree)})
		syscall.Sync()
		return w.marked(ctx, workload.Event{Kind: workload.KindSynced, ID: syncs, Mark: "sync-" + strconv.Itoa(syncs)})
	}
	// fsfreeze(8) from util-linux: FIFREEZE, then FITHAW once the
	// snapshot is taken, also when it failed.
	frozen := func(name string) error {
		if _, err := w.g.run(ctx, "fsfreeze", "--freeze", mnt); err != nil {
			return err
		}
		err := w.createSnapshot(ctx, name)
		if _, terr := w.g.run(ctx, "fsfreeze", "--unfreeze", mnt); terr != nil && err == nil {
			err = terr
		}
		return err
	}
	plan := []func() error{
		func() error { return round(0) },
		func() error { return round(1) },
		func() error { return frozen("snap1") },
		func() error { return round(2) },
		func() error { return round(3) },
		func() error { return round(4) },
		func() error { return frozen("snap2") },
		func() error { return round(5) },
		func() error { return round(6) },
		func() error { return w.clearSnapshot(ctx, "snap1") },
		func() error { return round(7) },
		func() error { return round(8) },
		func() error { return round(9) },
	}
	for i, fn := range plan {
		if err := w.g.step(fmt.Sprintf("%s: step %d", w.spec.Name(), i), fn); err != nil {
			return err
		}
	}
	return w.g.step(w.spec.Name()+": umount", func() error { return w.g.umount(ctx, mnt) })
}
