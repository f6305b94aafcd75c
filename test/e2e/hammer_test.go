package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// writerPy hammers an NBD export through libnbd, the reference client
// library: nthreads connections, each writing whole blocks of its own
// residue class (block % nthreads == thread), so that writes to one block are
// strictly sequential. It prints "writing" once every connection is up and
// the clock of its run has started. Every write fills its block with the 16-byte record
// (block, id) repeated, id unique over the run, and is logged as
// "id block submit_ns complete_ns" with CLOCK_MONOTONIC times. A thread
// stops at the deadline or at its first error (a killed daemon).
const writerPy = `
import nbd, random, struct, sys, threading, time
uri, nblocks, bs, nthreads, seconds, logpath = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
logs = [[] for _ in range(nthreads)]
errors = [None] * nthreads
ready = threading.Barrier(nthreads + 1)
stop_at = [0]
def worker(tid):
    h = nbd.NBD()
    h.connect_uri(uri)
    ready.wait()
    rnd = random.Random(tid)
    n = 0
    try:
        while time.monotonic_ns() < stop_at[0]:
            b = rnd.randrange(tid, nblocks, nthreads)
            n += 1
            wid = n * nthreads + tid
            buf = struct.pack('<QQ', b, wid) * (bs // 16)
            t0 = time.monotonic_ns()
            h.pwrite(buf, b * bs)
            t1 = time.monotonic_ns()
            logs[tid].append((wid, b, t0, t1))
        h.flush()
        h.shutdown()
    except Exception as e:
        errors[tid] = e
threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
for th in threads: th.start()
stop_at[0] = time.monotonic_ns() + int(seconds * 1e9)
ready.wait()
print('writing', flush=True)
for th in threads: th.join()
with open(logpath, 'w') as f:
    for l in logs:
        for r in l:
            f.write('%d %d %d %d\n' % r)
for e in errors:
    if e is not None:
        print('writer stopped:', e, file=sys.stderr)
`

type write struct {
	id, block        uint64
	submit, complete int64 // CLOCK_MONOTONIC ns
}

func monotonicNow() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// startWriter runs writerPy against uri in the background.
func startWriter(t *testing.T, dir, uri string, nblocks, bs, nthreads int, seconds float64) (*exec.Cmd, string) {
	t.Helper()
	py := testenv.RequireTool(t, "/usr/bin/python3")
	if err := exec.Command(py, "-c", "import nbd").Run(); err != nil {
		if testenv.Strict() {
			t.Fatalf("%s cannot import nbd: python3-libnbd is not installed (make deps installs it)", py)
		}
		t.Skipf("SKIP: python3-libnbd is not installed (make deps installs it)")
	}
	script := filepath.Join(dir, "writer.py")
	os.WriteFile(script, []byte(writerPy), 0o644)
	logPath := filepath.Join(dir, "writes.log")
	cmd := exec.Command(py, script, uri, strconv.Itoa(nblocks), strconv.Itoa(bs), strconv.Itoa(nthreads),
		strconv.FormatFloat(seconds, 'f', -1, 64), logPath)
	errs := &testenv.SyncBuffer{}
	cmd.Stderr = errs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait until it writes, so that "before" and "after" mean something on
	// a loaded machine too.
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "writing\n" {
		cmd.Wait()
		t.Fatalf("writer did not start: %q, %v\n%s", line, err, errs.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("writer stderr:\n%s", errs.String())
		}
	})
	return cmd, logPath
}

func readWrites(t *testing.T, path string) map[uint64][]write {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	byBlock := map[uint64][]write{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var w write
		if _, err := fmt.Sscan(sc.Text(), &w.id, &w.block, &w.submit, &w.complete); err != nil {
			t.Fatalf("write log line %q: %v", sc.Text(), err)
		}
		byBlock[w.block] = append(byBlock[w.block], w)
	}
	for _, ws := range byBlock {
		sort.Slice(ws, func(i, j int) bool { return ws[i].submit < ws[j].submit })
	}
	return byBlock
}

// pattern is the content of a block written by write id.
func pattern(block, id uint64, bs int) []byte {
	rec := make([]byte, 16)
	binary.LittleEndian.PutUint64(rec, block)
	binary.LittleEndian.PutUint64(rec[8:], id)
	return bytes.Repeat(rec, bs/16)
}

// TestSnapshotUnderWriteLoad: four libnbd connections hammer the origin
// export while `nbdsnap create` runs and keep writing afterwards. The create
// instant lies somewhere inside [create started, create returned]; so for
// every block the snapshot must hold exactly the last write that completed
// before the create started, or one of the writes submitted before the
// create returned (those that raced with it), or the initial content if
// there is none — never a torn block, never a write submitted after the
// create returned. The origin must hold every block's last write.
func TestSnapshotUnderWriteLoad(t *testing.T) {
	e2e(t)
	testenv.RequireTool(t, "nbdcopy")
	const (
		size     = 32 << 20
		bs       = 16 << 10 // four writes per 64 KiB cluster: partial-cluster copies
		nthreads = 4
		seconds  = 3.0
	)
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	initial := randomFile(t, origin, size)
	d := startDaemon(t, dir, origin)

	w, logPath := startWriter(t, dir, d.uri("data"), size/bs, bs, nthreads, seconds)
	time.Sleep(time.Duration(seconds / 3 * float64(time.Second)))
	createStart := monotonicNow()
	mustCLI(t, "create", "snap", "--control", d.ctl, "--backing", filepath.Join(dir, "snap.cow"))
	createEnd := monotonicNow()
	if err := w.Wait(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	writes := readWrites(t, logPath)

	snap := readExport(t, d.uri("snap"))
	orig := readExport(t, d.uri("data"))
	if len(snap) != size || len(orig) != size {
		t.Fatalf("export sizes %d, %d", len(snap), len(orig))
	}
	var before, racing, after, total int
	bad := 0
	for b := 0; b < size/bs; b++ {
		ws := writes[uint64(b)]
		total += len(ws)
		blk := func(img []byte) []byte { return img[b*bs : (b+1)*bs] }
		init := initial[b*bs : (b+1)*bs]

		want := init // the origin's final content of this block
		if len(ws) > 0 {
			last := ws[len(ws)-1]
			want = pattern(last.block, last.id, bs)
		}
		if !bytes.Equal(blk(orig), want) {
			t.Errorf("origin block %d lost a write", b)
			bad++
		}

		// Candidates for the snapshot's content of this block.
		allowed := [][]byte{init}
		for _, x := range ws {
			switch {
			case x.complete < createStart:
				allowed = [][]byte{pattern(x.block, x.id, bs)} // supersedes what came before
				before++
			case x.submit <= createEnd:
				allowed = append(allowed, pattern(x.block, x.id, bs))
				racing++
			default:
				after++
			}
		}
		ok := false
		for _, a := range allowed {
			ok = ok || bytes.Equal(blk(snap), a)
		}
		if !ok {
			bad++
			if bad <= 5 {
				t.Errorf("snapshot block %d holds none of the %d contents allowed at the create instant", b, len(allowed))
			}
		}
	}
	t.Logf("%d writes: %d completed before create started, %d raced with it (%.1f ms), %d after; create pause as reported: %s",
		total, before, racing, float64(createEnd-createStart)/1e6, after, pauseOf(t, d))
	if before == 0 || after == 0 {
		t.Fatalf("the writer did not run across the create (%d before, %d after)", before, after)
	}
	if bad > 0 {
		t.Fatalf("%d blocks wrong", bad)
	}
	if out := mustCLI(t, "status", "snap", "--control", d.ctl); !strings.Contains(out, ", valid") {
		t.Fatalf("status: %s", out)
	}
}

func pauseOf(t *testing.T, d *daemon) string {
	st := d.status(t)
	for _, s := range st.Snapshots {
		return (time.Duration(s.CreatePauseMicros) * time.Microsecond).String()
	}
	return "?"
}
