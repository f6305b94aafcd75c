package vfstest

import (
	"sync"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Stall holds the writes and syncs of the files it wraps while it is held,
// as a disk that stopped answering does (a hung network file system, a
// failing disk): from Hold until Resume, WriteAt and Sync block before they
// reach the file. Reads and everything else go through. A call never
// returns an error on its own account: once resumed, it does what it was
// asked. The zero value is ready to use.
type Stall struct {
	mu      sync.Mutex
	held    chan struct{} // non-nil while held; Resume closes it
	blocked int           // calls waiting now
}

// Hold makes writes and syncs wait from now on. Holding a held Stall does
// nothing.
func (s *Stall) Hold() {
	s.mu.Lock()
	if s.held == nil {
		s.held = make(chan struct{})
	}
	s.mu.Unlock()
}

// Resume lets every waiting and later write and sync through.
func (s *Stall) Resume() {
	s.mu.Lock()
	if s.held != nil {
		close(s.held)
		s.held = nil
	}
	s.mu.Unlock()
}

// Blocked returns how many calls are waiting now, so that a test knows that
// a writer reached the stalled disk without guessing with a sleep.
func (s *Stall) Blocked() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.blocked
}

// wait blocks while the Stall is held.
func (s *Stall) wait() {
	s.mu.Lock()
	held := s.held
	if held != nil {
		s.blocked++
	}
	s.mu.Unlock()
	if held == nil {
		return
	}
	<-held
	s.mu.Lock()
	s.blocked--
	s.mu.Unlock()
}

// Wrap returns f with its writes and syncs subject to s. The result
// implements only vfs.File (no Deallocator or Zeroer).
func (s *Stall) Wrap(f vfs.File) vfs.File { return &stallFile{File: f, s: s} }

type stallFile struct {
	vfs.File
	s *Stall
}

func (f *stallFile) WriteAt(p []byte, off int64) (int, error) {
	f.s.wait()
	return f.File.WriteAt(p, off)
}

func (f *stallFile) Sync() error {
	f.s.wait()
	return f.File.Sync()
}
