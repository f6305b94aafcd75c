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
// kills and restarts the server underneath, until it is stopped: each
// iteration writes one of 32 rotating 128 KiB files and overwrites 64 KiB
// of a file of set A in place, each followed by fsync, so that writes and
// flushes are always in flight and clusters that existed at the create
// instant keep being overwritten. Every write must succeed: the kernel
// holds the I/O while the server is away.
type writeLoad struct {
	stop  chan struct{} // closed to end the load after the iteration in progress
	done  chan struct{}
	err   error        // set before done is closed
	iters atomic.Int64 // completed iterations
	model fsModel      // owned by the goroutine until done is closed
}

func startLoad(ctx context.Context, root string, model fsModel, seed uint64) *writeLoad {
	l := &writeLoad{stop: make(chan struct{}), done: make(chan struct{}), model: model}
	targets := model.sorted("A/")
	go func() {
		defer close(l.done)
		r := rand.New(rand.NewPCG(seed, 3))
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			case <-ctx.Done():
				l.err = ctx.Err()
				return
			default:
			}
			rel := fmt.Sprintf("load/f%02d", i%32)
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

// finish stops the load and returns its error.
func (l *writeLoad) finish(ctx context.Context) error {
	close(l.stop)
	select {
	case <-l.done:
		return l.err
	case <-ctx.Done():
		return fmt.Errorf("the load did not stop (%d iterations done): %w", l.iters.Load(), ctx.Err())
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
