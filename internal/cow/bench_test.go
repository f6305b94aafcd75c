package cow

import (
	"context"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// benchOrigin creates a filled origin file of size bytes in dir.
func benchOrigin(b *testing.B, dir string, size int64) vfs.File {
	b.Helper()
	f, err := vfs.OS{}.OpenFile(filepath.Join(dir, "origin"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	return f
}

// firstWriteCase is one first-write benchmark.
type firstWriteCase struct {
	dir        string
	originSize int64
	cs         int
	// mode is "none" (no snapshot: the baseline), "transient",
	// "transient-nullstore", "persistent" (with a held-writes log: writes
	// held when the store's syncs are slow, held.go) or
	// "persistent-unheld" (no log: never held).
	mode    string
	writers int
	// writeSize is each write's length, at the start of its cluster; 0:
	// the whole cluster.
	writeSize int
	// syncDelay is added to every sync of the store (syncDelayFile).
	syncDelay time.Duration
}

// syncDelayFile is a store file whose syncs take delay longer: a disk
// whose flush has that latency but whose bandwidth is the underlying
// file's (/dev/shm in the benchmarks).
type syncDelayFile struct {
	vfs.File
	delay time.Duration
}

func (f syncDelayFile) Sync() error {
	time.Sleep(f.delay)
	return f.File.Sync()
}

func firstWriteBench(b *testing.B, dir string, originSize int64, cs int, mode string, writers int) {
	firstWriteRun(b, firstWriteCase{dir: dir, originSize: originSize, cs: cs, mode: mode, writers: writers})
}

// firstWriteRun measures writes to clusters no snapshot has copied yet,
// one write per cluster. Each round covers the whole origin once; between
// rounds, untimed, the snapshot is replaced by a fresh one.
func firstWriteRun(b *testing.B, fc firstWriteCase) {
	dir, originSize, cs, mode, writers := fc.dir, fc.originSize, fc.cs, fc.mode, fc.writers
	ctx := context.Background()
	origin := benchOrigin(b, dir, originSize)
	e, err := NewEngine(origin, EngineOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	if mode == "persistent" {
		// As the daemon does: a log of the default size on tmpfs.
		l, err := CreateHeldLog(filepath.Join(b.TempDir(), "held"), 64<<20, "bench")
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		e.UseHeldLog(l)
	}
	nclusters := originSize / int64(cs)
	storePath := filepath.Join(dir, "store")
	if mode == "transient-nullstore" {
		// Isolates the engine's own cost: a store that takes every
		// batch without doing I/O.
		e.newStore = func(_ vfs.File, o storeOptions) (clusterStore, error) { return nullStore{o}, nil }
	}
	var snap *Snapshot
	var syncs, copied, waits int64
	var pause time.Duration
	newSnap := func() {
		if snap != nil {
			info := snap.Info()
			syncs += info.Stats.Syncs
			copied += info.Stats.ClustersCopied
			waits += info.Stats.CacheFullWaits
			pause = max(pause, info.CreatePause)
			if err := e.Clear(snap.Name()); err != nil {
				b.Fatal(err)
			}
			os.Remove(storePath)
			snap = nil
		}
		if mode == "none" {
			return
		}
		st, err := vfs.OS{}.OpenFile(storePath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			b.Fatal(err)
		}
		if fc.syncDelay > 0 {
			st = syncDelayFile{st, fc.syncDelay}
		}
		persistent := strings.HasPrefix(mode, "persistent")
		snap, err = e.Create(ctx, st, SnapshotOptions{Name: "bench", ClusterSize: cs, Transient: !persistent})
		if err != nil {
			b.Fatal(err)
		}
	}
	wsize := cs
	if fc.writeSize > 0 {
		wsize = fc.writeSize
	}
	bufs := make([][]byte, writers)
	for i := range bufs {
		bufs[i] = make([]byte, wsize)
		for j := range bufs[i] {
			bufs[i][j] = byte(j + i)
		}
	}
	b.SetBytes(int64(wsize))
	b.ResetTimer()
	done := 0
	var cpu time.Duration // CPU time (user+system) of the timed parts
	for done < b.N {
		b.StopTimer()
		newSnap()
		round := min(int64(b.N-done), nclusters)
		var next atomic.Int64
		var wg sync.WaitGroup
		cpu0 := processCPU(b)
		b.StartTimer()
		for w := range writers {
			wg.Go(func() {
				p := bufs[w]
				for {
					i := next.Add(1) - 1
					if i >= round {
						return
					}
					if err := e.WriteAt(ctx, p, i*int64(cs), false); err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		// Held writes still on their way count: the next write would
		// wait for them, and the Clear between rounds drains them with
		// the timer stopped.
		if err := e.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		cpu += processCPU(b) - cpu0
		b.StartTimer()
		done += int(round)
	}
	b.StopTimer()
	// On a shared machine wall time varies with other load; the CPU the
	// process spent per write is steadier.
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	newSnap()
	if copied > 0 {
		b.ReportMetric(float64(syncs)/float64(copied), "syncs/cluster")
		b.ReportMetric(float64(waits)/float64(copied), "cachewaits/cluster")
		b.ReportMetric(float64(pause.Microseconds())/1000, "max-create-pause-ms")
	}
}

// BenchmarkFirstWrite: origin and store on /dev/shm, so that the ratio to
// the "none" case measures the engine, not a disk.
func BenchmarkFirstWrite(b *testing.B) {
	dir, err := os.MkdirTemp("/dev/shm", "nbdsnap-bench-")
	if err != nil {
		b.Skipf("no /dev/shm: %v", err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	for _, cs := range []int{4 << 10, 64 << 10, 1 << 20} {
		for _, writers := range []int{1, 4, 16} {
			for _, mode := range []string{"none", "transient-nullstore", "transient", "persistent"} {
				b.Run(fmt.Sprintf("cs=%dK/writers=%d/%s", cs>>10, writers, mode), func(b *testing.B) {
					firstWriteBench(b, dir, 256<<20, cs, mode, writers)
				})
			}
		}
	}
}

// BenchmarkFirstWriteDisk: persistent snapshots on the real disk under
// the test's temp dir; syncs/cluster shows what group commit saves.
func BenchmarkFirstWriteDisk(b *testing.B) {
	for _, writers := range []int{1, 4, 16} {
		for _, mode := range []string{"none", "persistent"} {
			b.Run(fmt.Sprintf("cs=64K/writers=%d/%s", writers, mode), func(b *testing.B) {
				firstWriteBench(b, b.TempDir(), 64<<20, 64<<10, mode, writers)
			})
		}
	}
}

// BenchmarkFirstWriteSyncLatency: origin and store on /dev/shm, each store
// sync 2 ms longer (syncDelayFile), as on a disk whose flush takes 2 ms:
// what a persistent snapshot's first writes cost when the sync is latency
// rather than bandwidth, held (the default) or not, next to transient.
func BenchmarkFirstWriteSyncLatency(b *testing.B) { firstWriteJobs(b, "/dev/shm", 2*time.Millisecond) }

// BenchmarkFirstWriteDiskModes: the same on /var/tmp, with no latency
// added: the syncs cost what this machine's disk makes them cost, and
// nothing of the NBD layer or of fio shares the CPUs.
func BenchmarkFirstWriteDiskModes(b *testing.B) { firstWriteJobs(b, "/var/tmp", 0) }

// firstWriteJobs runs the jobs of test/bench/firstwrite-ab.sh in each mode
// with origin and store in a directory under parent, each store sync
// syncDelay longer: 4 KiB at the start of each 64 KiB cluster by one
// writer, and whole 64 KiB clusters by 32 writers.
func firstWriteJobs(b *testing.B, parent string, syncDelay time.Duration) {
	dir, err := os.MkdirTemp(parent, "nbdsnap-bench-")
	if err != nil {
		b.Skipf("no %s: %v", parent, err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	jobs := []struct {
		name               string
		writers, writeSize int
	}{{"4k-qd1", 1, 4 << 10}, {"64k-qd32", 32, 64 << 10}}
	for _, job := range jobs {
		for _, mode := range []string{"transient", "persistent", "persistent-unheld"} {
			b.Run(job.name+"/"+mode, func(b *testing.B) {
				firstWriteRun(b, firstWriteCase{dir: dir, originSize: 256 << 20, cs: 64 << 10, mode: mode,
					writers: job.writers, writeSize: job.writeSize, syncDelay: syncDelay})
			})
		}
	}
}

// nullStore takes batches and forgets them (benchmarks of the engine alone).
type nullStore struct{ o storeOptions }

func (nullStore) commit([]storeCluster) (time.Duration, error)  { return 0, nil }
func (nullStore) readCluster(uint32, []byte, int) (bool, error) { return false, nil }
func (nullStore) forEachCopied(func(uint32))                    {}
func (nullStore) entry(uint32) (uint32, bool)                   { return 0, false }
func (nullStore) count() uint32                                 { return 0 }
func (nullStore) bookmark() error                               { return nil }
func (n nullStore) header() storeHeader {
	return storeHeader{Name: n.o.Name, ClusterSize: n.o.ClusterSize, OriginSize: n.o.OriginSize, Persistent: n.o.Persistent, Valid: true}
}
func (nullStore) invalidate(string) error { return nil }
func (nullStore) bytes() int64            { return 0 }
func (nullStore) close() error            { return nil }
func (nullStore) release() error          { return nil }

// processCPU returns the user+system CPU time this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCopyBound measures, on /dev/shm, the three copies a first write
// cannot avoid under fss's design: reading the old cluster into the cache,
// writing the new data over the origin, writing the old cluster to a fresh
// part of the store (a new file each 256 MiB, as a new snapshot's store);
// and the checksum a persistent store records for the cluster. Their CPU
// times summed and divided by the cores give a lower bound for a first
// write's time, to compare with BenchmarkFirstWrite's "none" (one overwrite
// per write, serialised by the file's lock). test/bench/engine.sh does.
func BenchmarkCopyBound(b *testing.B) {
	dir, err := os.MkdirTemp("/dev/shm", "nbdsnap-bench-")
	if err != nil {
		b.Skipf("no /dev/shm: %v", err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	const cs = 64 << 10
	const size = 256 << 20
	origin := benchOrigin(b, dir, size)
	buf := make([]byte, cs)
	castagnoli := crc32.MakeTable(crc32.Castagnoli)
	for _, op := range []string{"read", "overwrite", "fresh-write", "checksum"} {
		b.Run(op, func(b *testing.B) {
			b.SetBytes(cs)
			var cpu time.Duration
			for done := 0; done < b.N; {
				b.StopTimer()
				f := origin
				if op == "fresh-write" {
					path := filepath.Join(dir, "store")
					os.Remove(path)
					if f, err = (vfs.OS{}).OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644); err != nil {
						b.Fatal(err)
					}
				}
				round := min(b.N-done, size/cs)
				cpu0 := processCPU(b)
				b.StartTimer()
				for i := range round {
					switch op {
					case "read":
						_, err = f.ReadAt(buf, int64(i)*cs)
					case "checksum":
						buf[0] = byte(crc32.Checksum(buf, castagnoli)) // the store's CRC-32C
					default:
						_, err = f.WriteAt(buf, int64(i)*cs)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				cpu += processCPU(b) - cpu0
				if f != origin {
					f.Close()
				}
				done += round
			}
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}
