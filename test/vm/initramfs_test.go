package vm

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"
)

// archive is an initramfs under construction: a tree of directories,
// regular files and symbolic links, written out as a cpio "newc" archive,
// the format the kernel unpacks into its rootfs.
//
// Paths are kept relative to the root and free of symbolic links in their
// directory part: addHostPath resolves every link component by component and
// records the link itself, so /lib/x86_64-linux-gnu/libc.so.6 on a merged-/usr
// host becomes the link lib -> usr/lib plus the file usr/lib/x86_64-linux-gnu/libc.so.6,
// exactly as on the host.
type archive struct {
	entries map[string]entry
}

type entry struct {
	mode   fs.FileMode // fs.ModeDir, fs.ModeSymlink or 0, plus permission bits
	data   []byte      // file contents
	target string      // link target
}

func newArchive() *archive {
	return &archive{entries: map[string]entry{}}
}

func clean(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// dir adds a directory and its parents.
func (a *archive) dir(p string) {
	p = clean(p)
	if p == "" {
		return
	}
	if _, ok := a.entries[p]; ok {
		return
	}
	a.dir(path.Dir(p))
	a.entries[p] = entry{mode: fs.ModeDir | 0o755}
}

// file adds a regular file, replacing any earlier entry of that path.
func (a *archive) file(p string, perm fs.FileMode, data []byte) {
	p = clean(p)
	a.dir(path.Dir(p))
	a.entries[p] = entry{mode: perm.Perm(), data: data}
}

// symlink adds a symbolic link unless the path is taken: the busybox applet
// links are added last and must not shadow real binaries.
func (a *archive) symlink(p, target string) {
	p = clean(p)
	if _, ok := a.entries[p]; ok {
		return
	}
	a.dir(path.Dir(p))
	a.entries[p] = entry{mode: fs.ModeSymlink | 0o777, target: target}
}

func (a *archive) has(p string) bool {
	_, ok := a.entries[clean(p)]
	return ok
}

// addHostPath copies a host file into the archive at the same path,
// recreating every symbolic link met on the way.
func (a *archive) addHostPath(hostPath string) error {
	todo := strings.Split(clean(hostPath), "/")
	done := ""
	for hops := 0; len(todo) > 0; {
		next := path.Join(done, todo[0])
		todo = todo[1:]
		fi, err := os.Lstat("/" + next)
		if err != nil {
			return fmt.Errorf("initramfs: add %s: %w", hostPath, err)
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			if hops++; hops > 40 {
				return fmt.Errorf("initramfs: add %s: too many symbolic links", hostPath)
			}
			target, err := os.Readlink("/" + next)
			if err != nil {
				return fmt.Errorf("initramfs: add %s: %w", hostPath, err)
			}
			a.symlink(next, target)
			// Resolve again from the root: an absolute target as is, a
			// relative one from the link's directory.
			if !path.IsAbs(target) {
				target = path.Join(done, target)
			}
			done = ""
			todo = append(strings.Split(clean(target), "/"), todo...)
		case fi.IsDir():
			a.dir(next)
			done = next
		case fi.Mode().IsRegular() && len(todo) == 0:
			data, err := os.ReadFile("/" + next)
			if err != nil {
				return fmt.Errorf("initramfs: add %s: %w", hostPath, err)
			}
			a.file(next, fi.Mode(), data)
		default:
			return fmt.Errorf("initramfs: add %s: %s is neither a directory, a link nor a regular file", hostPath, next)
		}
	}
	return nil
}

// addBinary adds a host executable and every shared object `ldd` says it
// loads (ldd runs the dynamic loader in list mode; it does not execute the
// program).
func (a *archive) addBinary(hostPath string) error {
	if err := a.addHostPath(hostPath); err != nil {
		return err
	}
	libs, err := sharedLibraries(hostPath)
	if err != nil {
		return err
	}
	for _, l := range libs {
		if err := a.addHostPath(l); err != nil {
			return err
		}
	}
	return nil
}

// sharedLibraries lists the absolute paths ldd prints for a binary: the
// right-hand side of "libc.so.6 => /lib/.../libc.so.6 (0x...)" and the
// loader's own line "/lib64/ld-linux-x86-64.so.2 (0x...)". A static binary
// has none.
func sharedLibraries(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) || bytes.Contains(out, []byte("statically linked")) {
			return nil, nil
		}
		return nil, fmt.Errorf("initramfs: ldd %s: %w\n%s", bin, err, out)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		for _, f := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
			}
		}
	}
	return libs, sc.Err()
}

// write emits the archive in cpio newc format: parents before children
// (a sorted path list guarantees it), then the TRAILER!!! record.
func (a *archive) write(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for p := range a.entries {
		names = append(names, p)
	}
	sort.Strings(names)
	bw := bufio.NewWriter(w)
	ino := uint32(1)
	for _, p := range names {
		e := a.entries[p]
		var mode uint32
		var body []byte
		switch {
		case e.mode&fs.ModeDir != 0:
			mode = 0o040000 | uint32(e.mode.Perm())
		case e.mode&fs.ModeSymlink != 0:
			mode = 0o120000 | 0o777
			body = []byte(e.target)
		default:
			mode = 0o100000 | uint32(e.mode.Perm())
			body = e.data
		}
		nlink := uint32(1)
		if e.mode&fs.ModeDir != 0 {
			nlink = 2
		}
		writeCpioRecord(bw, ino, mode, nlink, p, body)
		ino++
	}
	writeCpioRecord(bw, 0, 0, 1, "TRAILER!!!", nil)
	return bw.Flush()
}

// writeCpioRecord writes one newc record: the 110-byte ASCII header, the
// NUL-terminated name padded to 4 bytes, the body padded to 4 bytes.
func writeCpioRecord(w *bufio.Writer, ino, mode, nlink uint32, name string, body []byte) {
	fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(name)+1, 0)
	w.WriteString(name)
	w.WriteByte(0)
	pad(w, 110+len(name)+1)
	w.Write(body)
	pad(w, len(body))
}

func pad(w *bufio.Writer, n int) {
	for ; n%4 != 0; n++ {
		w.WriteByte(0)
	}
}

// busyboxApplets adds a link to busybox for every applet it has, except
// "busybox" itself (a link onto itself would loop) and paths already taken
// by real binaries (e2fsprogs' mke2fs, e2fsck).
func (a *archive) busyboxApplets(busybox string) error {
	out, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("initramfs: %s --list-full: %w", busybox, err)
	}
	for _, p := range strings.Fields(string(out)) {
		name := path.Base(p)
		if name == "busybox" {
			continue
		}
		// The guest's /bin and /sbin are links into /usr, as on the host.
		dir := "usr/bin"
		if strings.Contains(p, "sbin/") {
			dir = "usr/sbin"
		}
		if a.has("usr/bin/"+name) || a.has("usr/sbin/"+name) {
			continue
		}
		a.symlink(path.Join(dir, name), "/usr/bin/busybox")
	}
	return nil
}

// writeFile writes the archive to a file.
func (a *archive) writeFile(name string) error {
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if err := a.write(f); err != nil {
		f.Close()
		return fmt.Errorf("initramfs: write %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("initramfs: write %s: %w", name, err)
	}
	return nil
}
