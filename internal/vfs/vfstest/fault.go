package vfstest

import (
	"os"
	"sync"
	"syscall"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// Rule says which operations a FaultFS fails and how.
//
// An operation matches when its kind is Kind (or Kind is OpAny), its file
// name is Name (or Name is empty), and Pred (if set) returns true. The rule
// counts matching operations from the moment it is injected and fires on the
// Nth one (Nth 0 and 1 both mean the first) and on the following ones until
// it has fired Times times (0 means once, a negative value means forever).
// Rules are tried in the order injected; the first that fires wins. Pred
// runs under the FaultFS's lock and must not call the FaultFS.
type Rule struct {
	Kind OpKind
	Name string
	Pred func(Op) bool
	Nth  int64
	// Times bounds how often the rule fires; see Rule.
	Times int
	// Err is the errno returned, wrapped in an *os.PathError; 0 means EIO.
	Err syscall.Errno
	// Partial makes a failing WriteAt first write a sector-aligned prefix
	// of half its bytes (a short write), as a file system running out of
	// space mid-request does.
	Partial bool
}

type rule struct {
	Rule
	seen, fired int64
}

// FaultFS wraps a vfs.FS and fails chosen operations. Files it opens, and
// files given to Wrap, share its rules and counters.
type FaultFS struct {
	fs vfs.FS

	mu       sync.Mutex
	rules    []*rule
	counts   [len(opNames)]int64
	injected int64
}

// NewFaultFS wraps fs. fs may be nil if the FaultFS is only used through
// Wrap.
func NewFaultFS(fs vfs.FS) *FaultFS {
	return &FaultFS{fs: fs}
}

// Inject adds a rule.
func (f *FaultFS) Inject(r Rule) {
	f.mu.Lock()
	f.rules = append(f.rules, &rule{Rule: r})
	f.mu.Unlock()
}

// Reset removes every rule; the counters are kept.
func (f *FaultFS) Reset() {
	f.mu.Lock()
	f.rules = nil
	f.mu.Unlock()
}

// Count returns how many operations of kind k were attempted (failed ones
// included); OpAny counts all.
func (f *FaultFS) Count(k OpKind) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[k]
}

// Injected returns how many faults have fired.
func (f *FaultFS) Injected() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.injected
}

// fault counts op and returns the rule that fires for it, if any.
func (f *FaultFS) fault(op Op) (Rule, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.counts[OpAny]++
	f.counts[op.Kind]++
	op.Seq = f.counts[op.Kind]
	for _, r := range f.rules {
		if r.Kind != OpAny && r.Kind != op.Kind || r.Name != "" && r.Name != op.Name {
			continue
		}
		if r.Pred != nil && !r.Pred(op) {
			continue
		}
		r.seen++
		if r.seen < r.Nth {
			continue
		}
		limit := int64(r.Times)
		if limit == 0 {
			limit = 1
		}
		if limit > 0 && r.fired >= limit {
			continue
		}
		r.fired++
		f.injected++
		return r.Rule, true
	}
	return Rule{}, false
}

func (f *FaultFS) err(op Op, pathOp string) error {
	r, ok := f.fault(op)
	if !ok {
		return nil
	}
	return ruleErr(r, pathOp, op.Name)
}

func ruleErr(r Rule, pathOp, name string) error {
	errno := r.Err
	if errno == 0 {
		errno = syscall.EIO
	}
	return &os.PathError{Op: pathOp, Path: name, Err: errno}
}

// OpenFile implements vfs.FS.
func (f *FaultFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	if err := f.err(Op{Kind: OpOpen, Name: name}, "open"); err != nil {
		return nil, err
	}
	file, err := f.fs.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return f.Wrap(name, file), nil
}

// Remove implements vfs.FS.
func (f *FaultFS) Remove(name string) error {
	if err := f.err(Op{Kind: OpRemove, Name: name}, "remove"); err != nil {
		return err
	}
	return f.fs.Remove(name)
}

// Wrap returns file with this FaultFS's rules applied to it under name. The
// result always implements vfs.Deallocator and vfs.Zeroer; if file does not,
// those fail with EOPNOTSUPP.
func (f *FaultFS) Wrap(name string, file vfs.File) vfs.File {
	return &faultFile{fs: f, f: file, name: name}
}

type faultFile struct {
	fs   *FaultFS
	f    vfs.File
	name string
}

var (
	_ vfs.File        = (*faultFile)(nil)
	_ vfs.Deallocator = (*faultFile)(nil)
	_ vfs.Zeroer      = (*faultFile)(nil)
)

func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fs.err(Op{Kind: OpRead, Name: f.name, Off: off, Len: int64(len(p))}, "read"); err != nil {
		return 0, err
	}
	return f.f.ReadAt(p, off)
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	r, ok := f.fs.fault(Op{Kind: OpWrite, Name: f.name, Off: off, Len: int64(len(p))})
	if !ok {
		return f.f.WriteAt(p, off)
	}
	n := 0
	if r.Partial {
		if half := len(p) / 2 / 512 * 512; half > 0 {
			var err error
			if n, err = f.f.WriteAt(p[:half], off); err != nil {
				return n, err
			}
		}
	}
	return n, ruleErr(r, "write", f.name)
}

func (f *faultFile) Sync() error {
	if err := f.fs.err(Op{Kind: OpSync, Name: f.name}, "fdatasync"); err != nil {
		return err
	}
	return f.f.Sync()
}

func (f *faultFile) Size() (int64, error) {
	if err := f.fs.err(Op{Kind: OpSize, Name: f.name}, "stat"); err != nil {
		return 0, err
	}
	return f.f.Size()
}

func (f *faultFile) Truncate(size int64) error {
	if err := f.fs.err(Op{Kind: OpTruncate, Name: f.name, Off: size}, "truncate"); err != nil {
		return err
	}
	return f.f.Truncate(size)
}

func (f *faultFile) Deallocate(off, length int64) error {
	if err := f.fs.err(Op{Kind: OpDeallocate, Name: f.name, Off: off, Len: length}, "fallocate punch-hole"); err != nil {
		return err
	}
	d, ok := f.f.(vfs.Deallocator)
	if !ok {
		return &os.PathError{Op: "fallocate punch-hole", Path: f.name, Err: syscall.EOPNOTSUPP}
	}
	return d.Deallocate(off, length)
}

func (f *faultFile) ZeroRange(off, length int64) error {
	if err := f.fs.err(Op{Kind: OpZeroRange, Name: f.name, Off: off, Len: length}, "fallocate zero-range"); err != nil {
		return err
	}
	z, ok := f.f.(vfs.Zeroer)
	if !ok {
		return &os.PathError{Op: "fallocate zero-range", Path: f.name, Err: syscall.EOPNOTSUPP}
	}
	return z.ZeroRange(off, length)
}

// Close is never failed: a test that injects faults still needs to release
// the file.
func (f *faultFile) Close() error { return f.f.Close() }
