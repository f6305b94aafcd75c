// Package stallfs mounts, for tests, a FUSE file system that mirrors a
// directory and whose writes can be held: a disk that stops answering (a
// hung network file system, a failing disk) for code that knows nothing of
// the test, such as the nbdsnap binary or an in-process daemon keeping a
// backing store there. Nothing in the code under test changes: it writes
// real files through the kernel, and a write waits in the kernel while the
// FS is held.
//
// The FUSE server runs in a helper process: the test binary itself, run
// again with an environment variable that [ServeIfAsked] (called first
// thing in the package's TestMain) recognises. A process that serves a FUSE
// mount and also waits in it cannot die: a thread of it stuck in a request
// keeps its /dev/fuse open, so nobody answers and nothing aborts the
// request, and a test that fails or times out would hang for good. With the
// server elsewhere, a test that dies closes the helper's standard input (the
// helper resumes, unmounts and exits), and a helper that dies aborts the
// connection, failing the writes instead of leaving them waiting.
//
// Only writes are held. A sync has nothing of the held writes to flush, and
// holding close (FUSE's flush) would keep a process that exits from
// finishing its exit. A held write gives up with EINTR when the kernel
// interrupts it (a signal reached the writing thread): Go's os.File retries
// a write interrupted so, so the code under test just keeps waiting, and a
// process that exits is not kept alive by its stuck thread. The kernel keeps
// a file locked while a write to it is in progress: reads of it through the
// mount wait for the held write too (read the mirrored directory instead).
//
// Mounting needs root (the mount is made with mount(2) directly) and FUSE 3;
// Mount skips the test otherwise, or fails it where tools are required
// (testenv). It skips under -short (make unit) too.
package stallfs

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// The helper process finds what to mount in these variables.
const (
	envUnder = "NBDSNAP_STALLFS_UNDER"
	envMount = "NBDSNAP_STALLFS_MOUNT"
)

// ServeIfAsked makes this process the FUSE server of a Mount of the parent
// test process, if it was started as one, and then exits; otherwise it
// returns at once. Call it at the start of TestMain in every package that
// calls Mount.
func ServeIfAsked() {
	under := os.Getenv(envUnder)
	if under == "" {
		return
	}
	if err := serve(under, os.Getenv(envMount), os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stdout, "error", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
	os.Exit(0)
}

// FS is a mounted stall file system, as the test sees it: each method is a
// command to the helper process, answered before it returns. Call them from
// the test's goroutine: a broken helper fails the test.
type FS struct {
	t   testing.TB
	dir string // the mountpoint

	mu  sync.Mutex // one command at a time
	in  io.Writer
	out *bufio.Reader
}

// Mount mirrors the directory under at a new mountpoint (Dir) until the
// test ends; then what is held is resumed and the FS unmounted.
func Mount(t testing.TB, under string) *FS {
	t.Helper()
	if testing.Short() {
		t.Skip("stallfs: a FUSE mount is not a unit test: skipped with -short")
	}
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fusermount3") // FUSE 3 is installed (test/setup.sh)
	s := &FS{t: t, dir: filepath.Join(t.TempDir(), "stall")}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envUnder+"="+under, envMount+"="+s.dir)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("stallfs: start the helper: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		in.Close() // the helper resumes, unmounts and exits
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			syscall.Unmount(s.dir, syscall.MNT_DETACH)
			t.Errorf("stallfs: the helper did not exit within 10s of the end of the test; killed")
		}
	})
	s.in, s.out = in, bufio.NewReader(out)
	if line, err := s.out.ReadString('\n'); line != "ready\n" {
		t.Fatalf("stallfs: the helper did not mount %s (%q, %v): does this package's TestMain call stallfs.ServeIfAsked?", s.dir, line, err)
	}
	return s
}

// Dir is the mountpoint: what is written under it goes to the mirrored
// directory, unless held.
func (s *FS) Dir() string { return s.dir }

// Hold makes writes wait from now on.
func (s *FS) Hold() { s.command("hold") }

// Resume lets the waiting writes, and later ones, through.
func (s *FS) Resume() { s.command("resume") }

// Blocked is how many writes wait now: a test can know that the code under
// test reached the held disk without guessing with a sleep.
func (s *FS) Blocked() int {
	n, err := strconv.Atoi(s.command("blocked"))
	if err != nil {
		s.t.Fatalf("stallfs: blocked: %v", err)
	}
	return n
}

// command sends one command to the helper and returns its answer.
func (s *FS) command(c string) string {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := fmt.Fprintln(s.in, c); err != nil {
		s.t.Fatalf("stallfs: %s: %v", c, err)
	}
	line, err := s.out.ReadString('\n')
	if err != nil {
		s.t.Fatalf("stallfs: %s: %v", c, err)
	}
	return strings.TrimSuffix(line, "\n")
}

// serve is the helper process: it mounts, answers the commands read from in
// until in ends, then resumes and unmounts.
func serve(under, mnt string, in io.Reader, out io.Writer) error {
	var st syscall.Stat_t
	if err := syscall.Stat(under, &st); err != nil {
		return fmt.Errorf("stallfs: %w", err)
	}
	h := &hold{}
	root := &fs.LoopbackRoot{Path: under, Dev: uint64(st.Dev)}
	rootNode := &node{LoopbackNode: &fs.LoopbackNode{RootData: root}, hold: h}
	root.RootNode = rootNode
	// No kernel caching of names or attributes: the code under test sees
	// at once what the test did to the directory beneath.
	var zero time.Duration
	server, err := fs.Mount(mnt, rootNode, &fs.Options{
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		MountOptions:    fuse.MountOptions{FsName: "stallfs", Name: "stallfs", DirectMount: true},
	})
	if err != nil {
		return fmt.Errorf("stallfs: mount %s: %w", mnt, err)
	}
	fmt.Fprintln(out, "ready")
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		switch sc.Text() {
		case "hold":
			h.hold()
			fmt.Fprintln(out, "ok")
		case "resume":
			h.resume()
			fmt.Fprintln(out, "ok")
		case "blocked":
			fmt.Fprintln(out, h.waiting())
		default:
			fmt.Fprintln(out, "unknown command")
		}
	}
	h.resume()
	if err := server.Unmount(); err != nil {
		// Files still open (a store the code under test left open): detach
		// the mount; the connection ends when they are closed or when this
		// process exits.
		if err := syscall.Unmount(mnt, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("stallfs: unmount %s: %w", mnt, err)
		}
	}
	return nil
}

// hold is the helper's state: whether writes wait, and how many do.
type hold struct {
	mu      sync.Mutex
	held    chan struct{} // non-nil while held; resume closes it
	blocked int
}

func (h *hold) hold() {
	h.mu.Lock()
	if h.held == nil {
		h.held = make(chan struct{})
	}
	h.mu.Unlock()
}

func (h *hold) resume() {
	h.mu.Lock()
	if h.held != nil {
		close(h.held)
		h.held = nil
	}
	h.mu.Unlock()
}

func (h *hold) waiting() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.blocked
}

// wait blocks while writes are held, or until the kernel interrupts the
// request (ctx ends), which it answers with EINTR.
func (h *hold) wait(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	held := h.held
	if held != nil {
		h.blocked++
	}
	h.mu.Unlock()
	if held == nil {
		return 0
	}
	defer func() {
		h.mu.Lock()
		h.blocked--
		h.mu.Unlock()
	}()
	select {
	case <-held:
		return 0
	case <-ctx.Done():
		return syscall.EINTR
	}
}

// node is a loopback node whose open files hold their writes.
type node struct {
	*fs.LoopbackNode
	hold *hold
}

var (
	_ fs.NodeWrapChilder = (*node)(nil)
	_ fs.NodeOpener      = (*node)(nil)
	_ fs.NodeCreater     = (*node)(nil)
)

// WrapChild makes every node of the tree a node of this FS.
func (n *node) WrapChild(_ context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{LoopbackNode: ops.(*fs.LoopbackNode), hold: n.hold}
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &file{loopbackFile: fh.(loopbackFile), hold: n.hold}, fl, 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	in, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return in, &file{loopbackFile: fh.(loopbackFile), hold: n.hold}, fl, 0
}

// loopbackFile is what a file of this FS forwards to the loopback file.
// It leaves out fs.FilePassthroughFder on purpose: with passthrough the
// kernel would send writes to the mirrored file itself, past the hold.
type loopbackFile interface {
	fs.FileReader
	fs.FileWriter
	fs.FileFlusher
	fs.FileFsyncer
	fs.FileReleaser
	fs.FileGetattrer
	fs.FileSetattrer
	fs.FileAllocater
	fs.FileLseeker
}

type file struct {
	loopbackFile
	hold *hold
}

func (f *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if errno := f.hold.wait(ctx); errno != 0 {
		return 0, errno
	}
	return f.loopbackFile.Write(ctx, data, off)
}
