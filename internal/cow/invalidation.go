package cow

import (
	"sync"
	"sync/atomic"
)

// invalidation is a snapshot's failure state machine (fss_error):
//
//	valid ──fail──▶ invalid, record due ──takeRecord, release──▶ invalid, released
//
// A transient snapshot is released as it fails: nothing of it outlives the
// daemon, so origin requests go on without it at once. A persistent one is
// released only after its invalidation was recorded (Snapshot.recordInvalid,
// by the committer) or abandon recorded it in the owner's record; until
// then origin requests that need it wait (a ticket at math.MaxUint64), so
// that no origin write goes on uncopied while a crash could reopen the
// snapshot as valid. invalid and released are never cleared, and the first
// reason stays.
//
// mu is a leaf: fail may run under the cache's or the committer's mu.
// Waking the requests that wait on those is the snapshot's job
// (Snapshot.wake): they check invalid under their own mu, and wake takes
// each mu after invalid is set, so no wake-up is lost.
type invalidation struct {
	invalid   atomic.Bool
	released  atomic.Bool
	recordDue atomic.Bool // the committer has the invalidation to record

	mu     sync.Mutex
	reason string
}

// fail makes the snapshot invalid for reason, released at once if release;
// it reports whether this call did (the snapshot was valid).
func (v *invalidation) fail(reason string, release bool) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.invalid.Load() {
		return false
	}
	v.reason = reason
	v.recordDue.Store(true)
	v.invalid.Store(true)
	if release {
		v.released.Store(true)
	}
	return true
}

// takeRecord hands the committer the invalidation to record, once.
func (v *invalidation) takeRecord() (string, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.recordDue.Load() {
		return "", false
	}
	v.recordDue.Store(false)
	return v.reason, true
}

// release lets origin requests go on without the snapshot.
func (v *invalidation) release() { v.released.Store(true) }

// restore sets the state of a snapshot reopened invalid: its invalidation
// is recorded already.
func (v *invalidation) restore(reason string) {
	v.mu.Lock()
	v.reason = reason
	v.invalid.Store(true)
	v.released.Store(true)
	v.mu.Unlock()
}

// why is the reason the snapshot is invalid, "" while it is valid.
func (v *invalidation) why() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.reason
}
