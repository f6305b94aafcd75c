package backstore

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// crashRun is the state of a workload at an instant: what it had been
// told was durable, and what was in flight.
type crashRun struct {
	created     bool            // Create returned
	acked       map[uint32]bool // clusters of Commits that returned nil
	inflight    []uint32        // the batch whose Commit is running
	invalidated bool            // Invalidate returned nil
	log         []string        // what the workload did, for the failure message
}

const crashOrigin = 1500 // clusters of 512 bytes: three metadata blocks

// crashWorkload commits random batches (some spanning several metadata
// blocks), closes and reopens the store now and then (new sessions), and
// invalidates it at the end. Before every mutating operation on fs it calls
// atOp with the workload's state at that instant.
func crashWorkload(t *testing.T, fs *vfstest.MemFS, seed uint64, atOp func(*crashRun)) int {
	r := rand.New(rand.NewPCG(seed, 0))
	run := &crashRun{acked: map[uint32]bool{}}
	ops := 0
	fs.OnOp(func(vfstest.Op) { ops++; atOp(run) })
	defer fs.OnOp(nil)
	opts := testOptions()
	opts.OriginSize = crashOrigin*512 - 200 // a partial last cluster
	s, err := Create(openMem(t, fs, "store"), opts)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	run.created = true
	perm := r.Perm(crashOrigin)
	next := 0
	for round := 0; next < 650; round++ {
		if r.IntN(12) == 0 {
			run.log = append(run.log, "reopen")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if s, err = Open(openMem(t, fs, "store"), nil); err != nil {
				t.Fatalf("reopen: %v", err)
			}
			continue
		}
		n := 1 + r.IntN(12)
		if r.IntN(15) == 0 {
			n = 200 + r.IntN(400)
		}
		var cs []uint32
		for _, c := range perm[next:min(next+n, len(perm))] {
			cs = append(cs, uint32(c))
		}
		next += len(cs)
		run.log = append(run.log, fmt.Sprintf("commit %d clusters", len(cs)))
		run.inflight = cs
		if err := s.Commit(makeBatch(s, seed, cs...)); err != nil {
			t.Fatalf("commit: %v", err)
		}
		run.inflight = nil
		for _, c := range cs {
			run.acked[c] = true
		}
	}
	run.log = append(run.log, "invalidate")
	if err := s.Invalidate("origin write failed: test"); err != nil {
		t.Fatal(err)
	}
	run.invalidated = true
	s.Close()
	return ops
}

// verifyCrashed opens the store a crash left behind and checks: it opens
// and passes Check; every cluster of an acknowledged Commit is there with
// its data; the interrupted batch is there entirely or not at all; nothing
// else is. Then, if goOn, the recovered store must take new batches and
// reopen.
func verifyCrashed(t *testing.T, c *vfstest.MemFS, seed uint64, run *crashRun, goOn bool) error {
	if _, err := Check(openMem(t, c, "store")); err != nil {
		if !run.created {
			return nil // the crash came before Create returned: any state is fine
		}
		return fmt.Errorf("check before open: %w", err)
	}
	s, err := Open(openMem(t, c, "store"), nil)
	if err != nil {
		if !run.created && !errors.Is(err, ErrCorrupt) {
			return nil
		}
		return fmt.Errorf("open: %w", err)
	}
	defer s.Close()
	if run.invalidated && s.Header().State != StateInvalid {
		return fmt.Errorf("acknowledged Invalidate lost")
	}
	got := map[uint32]bool{}
	s.ForEachCopied(func(c uint32) { got[c] = true })
	inflight := 0
	for _, cl := range run.inflight {
		if got[cl] {
			inflight++
		}
	}
	if inflight != 0 && inflight != len(run.inflight) {
		return fmt.Errorf("interrupted batch of %d clusters recovered partly: %d", len(run.inflight), inflight)
	}
	// A crash is never taken for damage, and the only batch this recovery
	// drops (rather than an earlier one's leftovers) is the interrupted one.
	rec := s.Recovery()
	if rec.Corrupt != "" {
		return fmt.Errorf("crash taken for damage: %s", rec.Corrupt)
	}
	if d := rec.DroppedClusters(); d != 0 && (inflight != 0 || d != len(run.inflight)) {
		return fmt.Errorf("recovery dropped %d clusters; the interrupted batch had %d, %d of them recovered: %+v", d, len(run.inflight), inflight, rec.Dropped)
	}
	for cl := range run.acked {
		if !got[cl] {
			return fmt.Errorf("acknowledged cluster %d lost (store holds %d, %d acknowledged)", cl, len(got), len(run.acked))
		}
	}
	if len(got) != len(run.acked)+inflight {
		return fmt.Errorf("store holds %d clusters, %d acknowledged + %d interrupted", len(got), len(run.acked), inflight)
	}
	for cl := range got {
		p := make([]byte, s.geo.clusterLen(cl))
		if ok, err := s.ReadCluster(cl, p, 0); !ok || err != nil {
			return fmt.Errorf("read cluster %d: %v %v", cl, ok, err)
		}
		if !bytes.Equal(p, clusterData(seed, cl, int64(len(p)))) {
			return fmt.Errorf("cluster %d: wrong data", cl)
		}
	}
	if _, err := Check(openMem(t, c, "store")); err != nil {
		return fmt.Errorf("check after open: %w", err)
	}
	if !goOn || s.Header().State != StateValid {
		return nil
	}
	// Life goes on: new batches after recovery (which overwrite what a
	// dropped batch left behind) and another reopen.
	var more []uint32
	for cl := uint32(0); cl < crashOrigin && len(more) < 40; cl++ {
		if !got[cl] {
			more = append(more, cl)
			got[cl] = true
		}
	}
	for i := 0; i < len(more); i += 8 {
		if err := s.Commit(makeBatch(s, seed, more[i:i+8]...)); err != nil {
			return fmt.Errorf("commit after recovery: %w", err)
		}
	}
	s.Close()
	s2, err := Open(openMem(t, c, "store"), nil)
	if err != nil {
		return fmt.Errorf("second open: %w", err)
	}
	defer s2.Close()
	if s2.CopiedCount() != len(got) {
		return fmt.Errorf("after recovery and more commits: %d clusters, want %d", s2.CopiedCount(), len(got))
	}
	if _, err := Check(openMem(t, c, "store")); err != nil {
		return fmt.Errorf("check after more commits: %w", err)
	}
	return nil
}

// TestCrashAtEveryWrite is Pebble's crash loop: a crash at the k-th
// mutating operation (write, sync, truncate) for every k = 1, 2, … until
// the workload ends. Rather than rerunning the workload for each k, it runs
// once and takes the crash clone at every operation (the same states, in
// linear rather than quadratic time); each clone is recovered and verified
// on the spot. Three flavours of crash: only synced data survives; a random
// part of the unsynced writes survives too; and those may be torn at
// 512-byte sectors.
func TestCrashAtEveryWrite(t *testing.T) {
	modes := []struct {
		name string
		opts func(r *rand.Rand) vfstest.CrashOptions
	}{
		{"synced-only", func(*rand.Rand) vfstest.CrashOptions { return vfstest.CrashOptions{} }},
		{"random-unsynced", func(r *rand.Rand) vfstest.CrashOptions { return vfstest.CrashOptions{Rand: r} }},
		{"torn", func(r *rand.Rand) vfstest.CrashOptions {
			return vfstest.CrashOptions{Rand: r, TornWrites: true, KeepProbability: 0.7}
		}},
	}
	for mi, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel() // each mode has its own MemFS
			seed := uint64(1000 + mi)
			every := 1
			if testing.Short() {
				every = 7
			}
			fs := vfstest.NewMemFS()
			points := 0
			ops := crashWorkload(t, fs, seed, func(run *crashRun) {
				k := fs.MutationCount() // this operation's number
				if k%int64(every) != 0 {
					return
				}
				points++
				c := fs.CrashClone(mode.opts(rand.New(rand.NewPCG(seed, uint64(k)))))
				if err := verifyCrashed(t, c, seed, run, points%3 == 0); err != nil {
					t.Fatalf("seed %d, crash at op %d (%s): %v\nworkload so far: %v", seed, k, mode.name, err, run.log)
				}
			})
			if ops < 600 {
				t.Fatalf("workload ran only %d operations", ops)
			}
			t.Logf("%d crash points", points)
		})
	}
}
