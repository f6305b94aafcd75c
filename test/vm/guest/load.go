package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
)

// writeLoad writes to a mounted origin from a goroutine while a scenario
// kills and restarts the server underneath: each iteration writes a new
// 128 KiB file and overwrites 64 KiB of an existing file of set A in place,
// each followed by fsync, so that writes and flushes are always in flight
// and clusters that existed at the create instant keep being overwritten.
// Every write must succeed: the kernel holds the I/O while the server is
// away.
type writeLoad struct {
	done  chan struct{}
	err   error        // set before done is closed
	iters atomic.Int64 // completed iterations
	model fsModel      // owned by the goroutine until done is closed
}

func startLoad(ctx context.Context, root string, model fsModel, iterations int, seed uint64) *writeLoad {
	l := &writeLoad{done: make(chan struct{}), model: model}
	targets := model.sorted("A/")
	go func() {
		defer close(l.done)
		r := rand.New(rand.NewPCG(seed, 3))
		for i := 0; i < iterations; i++ {
			if err := ctx.Err(); err != nil {
				l.err = err
				return
			}
			rel := fmt.Sprintf("load/f%03d", i)
			data := randomBytes(r, 128<<10)
			if err := writeSynced(filepath.Join(root, rel), data); err != nil {
				l.err = fmt.Errorf("load iteration %d: %w", i, err)
				return
			}
			l.model[rel] = data
			if len(targets) > 0 {
				t := targets[i%len(targets)]
				if err := overwrite(filepath.Join(root, t), l.model, t, r); err != nil {
					l.err = fmt.Errorf("load iteration %d: overwrite %s: %w", i, t, err)
					return
				}
				if err := syncFile(filepath.Join(root, t)); err != nil {
					l.err = fmt.Errorf("load iteration %d: fsync %s: %w", i, t, err)
					return
				}
			}
			l.iters.Add(1)
		}
	}()
	return l
}

// waitIters waits until the load has completed n iterations.
func (l *writeLoad) waitIters(ctx context.Context, n int64) error {
	for l.iters.Load() < n {
		select {
		case <-l.done:
			return fmt.Errorf("the load ended after %d iterations: %v", l.iters.Load(), l.err)
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if err := sleepCtx(ctx, 10); err != nil {
			return err
		}
	}
	return nil
}

// wait waits for the load to end and returns its error.
func (l *writeLoad) wait(ctx context.Context) error {
	select {
	case <-l.done:
		return l.err
	case <-ctx.Done():
		return fmt.Errorf("the load did not finish (%d iterations done): %w", l.iters.Load(), ctx.Err())
	}
}

func writeSynced(p string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncFile(p string) error {
	f, err := os.OpenFile(p, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
