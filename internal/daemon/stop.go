package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	sdaemon "github.com/coreos/go-systemd/v22/daemon"
)

// A stop (Shutdown) first goes the clean way: the control socket stops
// taking requests and waits for those under way, the NBD server stops
// reading requests and waits for those in flight to be answered, then the
// engine commits what it holds, closes the stores and syncs the origin.
//
// That can wait for ever: an origin write under a persistent snapshot waits
// for its old data to be committed to the store, and a store on a slow or
// stalled disk (a hung network file system, a failing disk) does not
// commit. So when ctx ends (the stop timeout, --stop-timeout), the stop is
// forced, in this order:
//
//  1. At once, the engine gives up on every snapshot whose store has not
//     caught up (cow.Engine.Abandon): it turns invalid for stoppedReason,
//     that is recorded in its state record, and only then are the origin
//     requests waiting for it released; they write the origin and are
//     answered. Snapshots whose store has caught up stay valid and are
//     closed cleanly (or, if step 3 leaves the close behind, reopen as
//     after a crash, valid).
//  2. answerGrace after the timeout, the NBD connections still open are
//     closed, with their requests unanswered: none was answered, so no
//     client was told its write is done.
//  3. At most exitGrace after the timeout, Shutdown returns whatever is
//     still under way: a goroutine stuck in a store call that never returns
//     (the writer of a stalled store, a request that was committing itself)
//     is left behind, and the process exits; the kernel closes the files.
//
// Invariants, forced or not:
//
//   - No write a client was told is done is lost: a request is answered
//     only after its origin write completed, and nothing a stop does undoes
//     or interrupts an origin write. (Acknowledged writes the clean way
//     did not get to sync are in the kernel's page cache, which the exit
//     of the process does not drop; FLUSH and FUA are what make a write
//     survive a power cut, forced stop or not.)
//   - No snapshot is left looking valid after an origin write it did not
//     copy: the engine releases a waiting origin write only once the
//     snapshot's record says invalid (durably, fsynced), and never writes a
//     store it gave up on (a writer may be inside it). A snapshot whose
//     invalidation cannot be recorded keeps its waiting requests blocked
//     until the process exits: they never touch the origin, and the store
//     holds a snapshot that is right. A restart lists a snapshot given up on
//     as invalid with the reason and never serves it.
//
// The result says what happened: nil for a clean stop, an error matching
// ErrStopForced when the timeout forced anything (`nbdsnap serve` exits
// with its own code then), other errors for other failures.
const (
	// stoppedReason is why a snapshot given up on at the stop timeout is
	// invalid.
	stoppedReason = "daemon stopped before the store caught up"
	// answerGrace is how long the requests released at the stop timeout
	// have to write the origin and be answered before their connections
	// are cut. They have been waiting for the store, not for the origin:
	// an origin write takes milliseconds.
	answerGrace = 400 * time.Millisecond
	// exitGrace bounds how far past the stop timeout Shutdown returns. The
	// documented bound is a second (serve's help, the units): this leaves
	// the rest to the process's exit.
	exitGrace = 600 * time.Millisecond
)

// ErrStopForced matches the error of a Shutdown that its context's end
// forced: snapshots invalidated, connections or control requests cut, or
// goroutines stuck in store calls left behind. The error says which.
var ErrStopForced = errors.New("stop forced at the stop timeout")

// stopProgress is how far the clean way of stopping (stopServing) got, for
// the report of a forced stop, which may have to be made while it is still
// under way.
type stopProgress struct {
	stage    atomic.Int32 // a stopStage: what it waits for
	ctlCut   atomic.Bool  // control requests under way were cut at the timeout
	connsCut atomic.Bool  // NBD connections were closed with requests in flight
}

// stopStage is what stopServing waits for.
type stopStage int32

const (
	stageControl stopStage = iota // control requests under way
	stageNBD                      // NBD requests in flight
	stageClose                    // the engine and the origin to close
)

func (s stopStage) String() string {
	switch s {
	case stageControl:
		return "control requests under way"
	case stageNBD:
		return "NBD requests in flight"
	}
	return "the engine and the origin to close"
}

// abandonment is what the engine gave up at the timeout.
type abandonment struct {
	names []string // snapshots invalidated
	err   error    // snapshots that could not be released
}

// shutdown is Shutdown's single run; see the comment at the top.
func (d *Daemon) shutdown(ctx context.Context) error {
	notify(d.log, sdaemon.SdNotifyStopping)
	abandoned := make(chan abandonment, 1)
	stopAbandon := context.AfterFunc(ctx, func() {
		d.log.Warn("stop timeout reached: giving up on the stores that have not caught up")
		names, err := d.engine.Abandon(stoppedReason)
		abandoned <- abandonment{names, err}
	})
	var p stopProgress
	stopped := make(chan error, 1)
	go func() { stopped <- d.stopServing(ctx, &p) }()

	var (
		err    error // stopServing's
		ab     abandonment
		done   bool // stopServing returned
		abDone bool // Abandon returned
	)
	select {
	case err = <-stopped:
		done = true
		if stopAbandon() {
			return err // the timeout never came
		}
	case <-ctx.Done():
	}
	limit := time.NewTimer(exitGrace)
	defer limit.Stop()
wait:
	for !done || !abDone {
		select {
		case err = <-stopped:
			done = true
		case ab = <-abandoned:
			abDone = true
		case <-limit.C:
			break wait
		}
	}

	stage := stopStage(p.stage.Load())
	var forced []string
	if len(ab.names) > 0 {
		forced = append(forced, fmt.Sprintf("snapshot(s) %s invalidated (%s)", strings.Join(ab.names, ", "), stoppedReason))
	}
	if ab.err != nil {
		forced = append(forced, ab.err.Error())
	}
	if !abDone {
		forced = append(forced, "the invalidation of the snapshots whose store had not caught up was still being recorded; the origin requests waiting for them were not released")
	}
	if p.ctlCut.Load() {
		forced = append(forced, "control requests under way cut")
	}
	// Still waiting for NBD requests past answerGrace (exitGrace is
	// longer): the server has closed their connections.
	if p.connsCut.Load() || !done && stage == stageNBD {
		forced = append(forced, "NBD connections with requests in flight closed")
	}
	if !done {
		forced = append(forced, fmt.Sprintf("gave up waiting for %v (a store call that does not return?); left behind", stage))
	}
	if len(forced) == 0 {
		return err
	}
	return errors.Join(fmt.Errorf("%w: %s", ErrStopForced, strings.Join(forced, "; ")), err)
}

// stopServing is the clean way of stopping. Its waits end with ctx (the
// control socket's) or answerGrace after it (the NBD server's), so that the
// requests the engine releases at the timeout are answered; closing the
// engine needs no deadline of its own, because once the engine gave up on a
// store it waits for nothing of it. p records how far it got.
func (d *Daemon) stopServing(ctx context.Context, p *stopProgress) error {
	var errs []error
	// First the control socket, so no Create or Clear starts while the
	// engine closes; Shutdown waits for one under way.
	p.stage.Store(int32(stageControl))
	if err := d.ctl.Shutdown(ctx); err != nil {
		if ctx.Err() == nil {
			errs = append(errs, fmt.Errorf("control socket: %w", err))
		} else {
			p.ctlCut.Store(true) // closeAll closes their connections
		}
	}
	p.stage.Store(int32(stageNBD))
	nctx, cancel := afterGrace(ctx, answerGrace)
	defer cancel()
	if err := d.srv.Shutdown(nctx); err != nil {
		p.connsCut.Store(true) // it fails only when nctx ended first
	}
	p.stage.Store(int32(stageClose))
	if err := d.closeAll(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// afterGrace returns a context that ends grace after ctx ends.
func afterGrace(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	g, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(grace, cancel) })
	return g, func() { stop(); cancel() }
}
