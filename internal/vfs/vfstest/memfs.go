package vfstest

import (
	"io"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// MemFS is an in-memory vfs.FS that can simulate a crash. The zero value is
// not usable; call [NewMemFS].
//
// Each file keeps two images: cur, what reads see now, and durable, what
// survived the last completed Sync, plus the list of mutating operations
// issued since that Sync (pending). Sync replays pending onto durable. A
// crash keeps durable, and optionally a random subset of pending.
//
// Creating and removing a file are durable when the call returns, as the vfs
// contract says. Truncate, Deallocate and ZeroRange are, like writes,
// durable only after a Sync.
type MemFS struct {
	mu    sync.Mutex
	files map[string]*node
	hook  func(Op)
	crash *crashPoint

	// seq counts mutating operations (write, sync, truncate, deallocate,
	// zero-range) over the life of this MemFS; it numbers crash points.
	seq atomic.Int64
}

// crashPoint is an armed CrashAt: before mutating operation k, clone.
type crashPoint struct {
	k     int64
	opts  CrashOptions
	clone *MemFS
}

// node is one file's contents. Handles opened on the same name share it; a
// removed node lives on in its open handles, as on Unix.
type node struct {
	mu      sync.RWMutex
	cur     []byte
	durable []byte
	pending []pendingOp
	// devSize > 0 makes the node a simulated block device of that fixed
	// size: Truncate fails, writes past the end fail with ENOSPC.
	devSize int64
}

// pendingOp is a mutation not yet covered by a Sync.
type pendingOp struct {
	kind OpKind
	off  int64  // write/range offset; truncate: the new size
	data []byte // write: a private copy of the bytes
	n    int64  // deallocate/zero-range length
}

// NewMemFS returns an empty MemFS.
func NewMemFS() *MemFS {
	return &MemFS{files: make(map[string]*node)}
}

// OnOp installs fn to be called before every mutating operation (write,
// sync, truncate, deallocate, zero-range), with Op.Seq its 1-based ordinal
// over the life of this MemFS. fn runs with no MemFS lock held, so it may
// call CrashClone. nil removes the hook.
func (fs *MemFS) OnOp(fn func(Op)) {
	fs.mu.Lock()
	fs.hook = fn
	fs.mu.Unlock()
}

// CrashAt arms a crash point: immediately before the k-th mutating operation
// (counted as in OnOp, from the creation of this MemFS) a CrashClone(opts) is
// taken and kept; Crashed returns it. The operation itself then proceeds on
// this MemFS, so the workload continues undisturbed; only what it did before
// the crash point can be expected in the clone.
func (fs *MemFS) CrashAt(k int64, opts CrashOptions) {
	fs.mu.Lock()
	fs.crash = &crashPoint{k: k, opts: opts}
	fs.mu.Unlock()
}

// Crashed returns the clone taken by the armed CrashAt, or nil if the
// workload has not reached the crash point.
func (fs *MemFS) Crashed() *MemFS {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.crash == nil {
		return nil
	}
	return fs.crash.clone
}

// MutationCount returns the number of mutating operations so far.
func (fs *MemFS) MutationCount() int64 { return fs.seq.Load() }

// beforeMutation numbers a mutating operation and runs the crash point and
// hook. It must be called with no node lock held.
func (fs *MemFS) beforeMutation(op Op) {
	op.Seq = fs.seq.Add(1)
	fs.mu.Lock()
	hook, cp := fs.hook, fs.crash
	fs.mu.Unlock()
	if cp != nil && cp.k == op.Seq {
		c := fs.CrashClone(cp.opts)
		fs.mu.Lock()
		cp.clone = c
		fs.mu.Unlock()
	}
	if hook != nil {
		hook(op)
	}
}

// OpenFile implements vfs.FS. Supported flags: the access mode, O_CREATE,
// O_EXCL and O_TRUNC; perm is ignored.
func (fs *MemFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	fs.mu.Lock()
	n, ok := fs.files[name]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		fs.mu.Unlock()
		return nil, &os.PathError{Op: "open", Path: name, Err: syscall.EEXIST}
	case !ok && flag&os.O_CREATE == 0:
		fs.mu.Unlock()
		return nil, &os.PathError{Op: "open", Path: name, Err: syscall.ENOENT}
	case !ok:
		n = &node{}
		fs.files[name] = n
	}
	fs.mu.Unlock()
	f := &memFile{fs: fs, n: n, name: name, flag: flag}
	if flag&os.O_TRUNC != 0 && n.devSize == 0 {
		if err := f.Truncate(0); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// Remove implements vfs.FS. Open handles keep working on the removed file.
func (fs *MemFS) Remove(name string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if _, ok := fs.files[name]; !ok {
		return &os.PathError{Op: "remove", Path: name, Err: syscall.ENOENT}
	}
	delete(fs.files, name)
	return nil
}

// CreateDevice creates name as a simulated block device of a fixed size,
// zero-filled and durable: Size reports size, Truncate fails with EINVAL and
// writes past the end fail with ENOSPC.
func (fs *MemFS) CreateDevice(name string, size int64) error {
	if size <= 0 {
		return &os.PathError{Op: "mkdev", Path: name, Err: syscall.EINVAL}
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if _, ok := fs.files[name]; ok {
		return &os.PathError{Op: "mkdev", Path: name, Err: syscall.EEXIST}
	}
	fs.files[name] = &node{cur: make([]byte, size), durable: make([]byte, size), devSize: size}
	return nil
}

// Names returns the names of the files, sorted.
func (fs *MemFS) Names() []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	names := make([]string, 0, len(fs.files))
	for name := range fs.files {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// Contents returns a copy of the current contents of name.
func (fs *MemFS) Contents(name string) ([]byte, error) {
	fs.mu.Lock()
	n, ok := fs.files[name]
	fs.mu.Unlock()
	if !ok {
		return nil, &os.PathError{Op: "read", Path: name, Err: syscall.ENOENT}
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	return append([]byte(nil), n.cur...), nil
}

// UnsyncedOps returns how many mutating operations on name are not yet
// covered by a Sync.
func (fs *MemFS) UnsyncedOps(name string) int {
	fs.mu.Lock()
	n, ok := fs.files[name]
	fs.mu.Unlock()
	if !ok {
		return 0
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	return len(n.pending)
}

// memFile is an open handle. Its methods mirror *os.File: ReadAt returns
// io.EOF when it reads short, errors are *os.PathError.
type memFile struct {
	fs     *MemFS
	n      *node
	name   string
	flag   int
	closed atomic.Bool
}

var (
	_ vfs.File        = (*memFile)(nil)
	_ vfs.Deallocator = (*memFile)(nil)
	_ vfs.Zeroer      = (*memFile)(nil)
)

func (f *memFile) pathErr(op string, err error) error {
	return &os.PathError{Op: op, Path: f.name, Err: err}
}

func (f *memFile) check(op string, write bool) error {
	if f.closed.Load() {
		return f.pathErr(op, os.ErrClosed)
	}
	mode := f.flag & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
	if write && mode == os.O_RDONLY || !write && mode == os.O_WRONLY {
		return f.pathErr(op, syscall.EBADF)
	}
	return nil
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check("read", false); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, f.pathErr("read", syscall.EINVAL)
	}
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	if off >= int64(len(f.n.cur)) {
		return 0, io.EOF
	}
	n := copy(p, f.n.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check("write", true); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, f.pathErr("write", syscall.EINVAL)
	}
	f.fs.beforeMutation(Op{Kind: OpWrite, Name: f.name, Off: off, Len: int64(len(p))})
	f.n.mu.Lock()
	defer f.n.mu.Unlock()
	var err error
	if d := f.n.devSize; d > 0 && off+int64(len(p)) > d {
		// A block device takes what fits and then reports the end.
		if off >= d {
			return 0, f.pathErr("write", syscall.ENOSPC)
		}
		p, err = p[:d-off], f.pathErr("write", syscall.ENOSPC)
	}
	if len(p) == 0 {
		return 0, err
	}
	op := pendingOp{kind: OpWrite, off: off, data: append([]byte(nil), p...)}
	f.n.cur = op.apply(f.n.cur)
	f.n.pending = append(f.n.pending, op)
	return len(p), err
}

func (f *memFile) Sync() error {
	// fdatasync works on any open handle, read-only ones included.
	if f.closed.Load() {
		return f.pathErr("fdatasync", os.ErrClosed)
	}
	f.fs.beforeMutation(Op{Kind: OpSync, Name: f.name})
	f.n.mu.Lock()
	defer f.n.mu.Unlock()
	for _, op := range f.n.pending {
		f.n.durable = op.apply(f.n.durable)
	}
	f.n.pending = nil
	return nil
}

func (f *memFile) Size() (int64, error) {
	if f.closed.Load() {
		return 0, f.pathErr("stat", os.ErrClosed)
	}
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	return int64(len(f.n.cur)), nil
}

func (f *memFile) Truncate(size int64) error {
	if err := f.check("truncate", true); err != nil {
		return err
	}
	if size < 0 || f.n.devSize > 0 {
		return f.pathErr("truncate", syscall.EINVAL)
	}
	f.fs.beforeMutation(Op{Kind: OpTruncate, Name: f.name, Off: size})
	f.n.mu.Lock()
	defer f.n.mu.Unlock()
	op := pendingOp{kind: OpTruncate, off: size}
	f.n.cur = op.apply(f.n.cur)
	f.n.pending = append(f.n.pending, op)
	return nil
}

// Deallocate punches a hole: the range reads back as zeros, the size does not
// change (FALLOC_FL_KEEP_SIZE).
func (f *memFile) Deallocate(off, length int64) error {
	return f.zero(OpDeallocate, "fallocate punch-hole", off, length)
}

// ZeroRange zeroes a range without changing the size.
func (f *memFile) ZeroRange(off, length int64) error {
	return f.zero(OpZeroRange, "fallocate zero-range", off, length)
}

func (f *memFile) zero(kind OpKind, name string, off, length int64) error {
	if err := f.check(name, true); err != nil {
		return err
	}
	if off < 0 || length <= 0 {
		return f.pathErr(name, syscall.EINVAL)
	}
	f.fs.beforeMutation(Op{Kind: kind, Name: f.name, Off: off, Len: length})
	f.n.mu.Lock()
	defer f.n.mu.Unlock()
	op := pendingOp{kind: kind, off: off, n: length}
	f.n.cur = op.apply(f.n.cur)
	f.n.pending = append(f.n.pending, op)
	return nil
}

func (f *memFile) Close() error {
	if f.closed.Swap(true) {
		return f.pathErr("close", os.ErrClosed)
	}
	return nil
}

// apply performs op on an image and returns the (possibly reallocated)
// image. Used for the current image, for Sync's replay onto the durable
// image, and for a crash clone's replay of kept operations.
func (op pendingOp) apply(b []byte) []byte {
	switch op.kind {
	case OpWrite:
		end := op.off + int64(len(op.data))
		b = grow(b, end)
		copy(b[op.off:end], op.data)
	case OpTruncate:
		if op.off <= int64(len(b)) {
			b = b[:op.off]
		} else {
			b = grow(b, op.off)
		}
	case OpDeallocate, OpZeroRange:
		if op.off < int64(len(b)) {
			clear(b[op.off:min(op.off+op.n, int64(len(b)))])
		}
	}
	return b
}

// grow extends b with zeros to at least size bytes. Bytes past len(b) in the
// backing array may hold stale data from an earlier shrink, hence the clear.
func grow(b []byte, size int64) []byte {
	if size <= int64(len(b)) {
		return b
	}
	old := len(b)
	if size <= int64(cap(b)) {
		b = b[:size]
	} else {
		nb := make([]byte, size, max(size, int64(cap(b))*2))
		copy(nb, b)
		b = nb
	}
	clear(b[old:])
	return b
}
