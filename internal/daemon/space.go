package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/cow"
)

// Store space thresholds. A store that fills its --max-size, or its file
// system, invalidates its snapshot; warning before that gives the operator
// time to clear older snapshots or make room.
const (
	spaceWarnPercent = 80
	spaceCritPercent = 95
	// The file system holding a file store is low when less than
	// min(fsReservePercent of it, fsReserveMax) is free.
	fsReservePercent = 5
	fsReserveMax     = 1 << 30
	// defaultSpaceInterval is how often the watch looks at every store;
	// statfs at most once per spaceStatfsMin per store, whoever asks
	// (the watch, a status, a scrape), so that none of them costs a
	// system call per write or per request.
	defaultSpaceInterval = 5 * time.Second
	spaceStatfsMin       = time.Second
)

// spaceState is what the watch last found for one snapshot's store; it
// remembers which thresholds were passed so that each crossing is logged
// once, not at every check.
type spaceState struct {
	mu      sync.Mutex
	checked time.Time // last statfs
	fsFree  int64     // bytes of the store's file system available to the daemon
	fsSize  int64     // bytes of that file system
	fsErr   error
	percent int  // the highest --max-size threshold passed: 0, 80 or 95
	fsLow   bool // the file system is under its reserve
}

// storeSpace is one snapshot's store space, as status and metrics show it.
type storeSpace struct {
	storeBytes int64
	maxSize    int64 // 0: none
	fsFree     int64 // -1: not known (a block device store, or statfs failed)
	fsSize     int64
	// free is what the store may still grow: the smaller of what
	// --max-size leaves and fsFree; -1 when neither is known.
	free int64
	// level: 0 fine, 1 past 80% of --max-size, 2 past 95% or the file
	// system under its reserve.
	level int
}

// spaceOf returns the watch state of the snapshot called name, creating it.
func (d *Daemon) spaceOf(name string) *spaceState {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, ok := d.spaces[name]
	if !ok {
		st = &spaceState{}
		d.spaces[name] = st
	}
	return st
}

// checkSpace measures a snapshot's store space and logs every threshold it
// has newly passed. rec is the snapshot's record, snap its open snapshot.
func (d *Daemon) checkSpace(rec snapRecord, snap *cow.Snapshot, now time.Time) storeSpace {
	i := snap.Info()
	sp := storeSpace{storeBytes: i.StoreBytes, maxSize: rec.MaxSize, fsFree: -1, free: -1}
	st := d.spaceOf(rec.Name)
	st.mu.Lock()
	defer st.mu.Unlock()
	if !rec.Device && now.Sub(st.checked) >= spaceStatfsMin {
		st.checked = now
		st.fsFree, st.fsSize, st.fsErr = statfs(filepath.Dir(rec.BackingPath))
		if st.fsErr != nil {
			d.log.Warn("cannot check the free space of a snapshot store's file system", "snapshot", rec.Name, "err", st.fsErr)
		}
	}
	if !rec.Device && st.fsErr == nil && !st.checked.IsZero() {
		sp.fsFree, sp.fsSize, sp.free = st.fsFree, st.fsSize, st.fsFree
	}
	if rec.MaxSize > 0 {
		left := max(rec.MaxSize-sp.storeBytes, 0)
		if sp.free < 0 || left < sp.free {
			sp.free = left
		}
	}
	// Only a valid snapshot's store can still grow: an invalid one is not
	// worth a warning.
	if !i.Valid {
		return sp
	}
	percent := 0
	if rec.MaxSize > 0 {
		switch used := sp.storeBytes * 100 / rec.MaxSize; {
		case used >= spaceCritPercent:
			percent = spaceCritPercent
		case used >= spaceWarnPercent:
			percent = spaceWarnPercent
		}
	}
	if percent > st.percent {
		d.log.Warn(fmt.Sprintf("snapshot store passed %d%% of its max size", percent),
			"snapshot", rec.Name, "store_bytes", sp.storeBytes, "max_size", rec.MaxSize, "backing", rec.BackingPath)
	}
	st.percent = percent
	fsLow := false
	if sp.fsFree >= 0 {
		fsLow = sp.fsFree < fsReserve(sp.fsSize)
	}
	switch {
	case fsLow && !st.fsLow:
		d.log.Warn("snapshot store's file system is nearly full",
			"snapshot", rec.Name, "fs_free", sp.fsFree, "reserve", fsReserve(sp.fsSize), "backing", rec.BackingPath)
	case !fsLow && st.fsLow:
		d.log.Info("snapshot store's file system has room again", "snapshot", rec.Name, "fs_free", sp.fsFree)
	}
	st.fsLow = fsLow
	switch {
	case fsLow || percent == spaceCritPercent:
		sp.level = 2
	case percent == spaceWarnPercent:
		sp.level = 1
	}
	return sp
}

// fsReserve is the free space under which a store's file system is
// nearly full: 5% of it, but no more than 1 GiB, since 5% of a large file
// system is more than any store needs to be warned in time.
func fsReserve(fsSize int64) int64 { return min(fsSize*fsReservePercent/100, fsReserveMax) }

// statfs returns the bytes available to an unprivileged writer and the
// size of the file system holding dir.
func statfs(dir string) (free, size int64, err error) {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return 0, 0, &os.PathError{Op: "statfs", Path: dir, Err: err}
	}
	return int64(s.Bavail) * s.Bsize, int64(s.Blocks) * s.Bsize, nil
}

// watchSpace checks every snapshot's store every interval until done is
// closed.
func (d *Daemon) watchSpace(interval time.Duration, done <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case now := <-t.C:
			for _, e := range d.openEntries() {
				d.checkSpace(e.rec, e.snap, now)
			}
		}
	}
}

// openEntries returns copies of the entries whose snapshot is open.
func (d *Daemon) openEntries() []entry {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]entry, 0, len(d.snaps))
	for _, e := range d.snaps {
		if e.snap != nil {
			out = append(out, *e)
		}
	}
	return out
}
