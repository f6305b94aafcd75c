package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// TestMemoryFlood: 60 clients each pipeline three 32 MiB requests (reads,
// or writes with their payloads) and never read a reply. Without a bound
// on what requests in flight hold, the daemon went from 8 MB to 3.9 GB of
// RSS with the reads. Now its peak RSS stays under 512 MiB, a client on
// another connection is served meanwhile, and once the attackers are gone
// the daemon returns to within 64 MiB of its idle RSS in 10 s.
func TestMemoryFlood(t *testing.T) {
	e2e(t)
	for _, cmd := range []uint16{cmdRead, cmdWrite} {
		name := map[uint16]string{cmdRead: "reads", cmdWrite: "writes"}[cmd]
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			origin := filepath.Join(dir, "origin.img")
			writeRandom(t, origin, 65<<20) // the attackers use the first 64 MiB
			d := startDaemon(t, dir, origin)
			pid := d.cmd.Process.Pid

			good := dialExport(t, d.sock, "data")
			good.check(t, 1)
			time.Sleep(200 * time.Millisecond)
			idle := testenv.ProcStatus(t, pid, "VmRSS")

			const clients, pipelined, length = 60, 3, 32 << 20
			payload := make([]byte, length)
			var wg sync.WaitGroup
			var attackers []*rawExport
			for i := range clients {
				a := dialExport(t, d.sock, "data")
				attackers = append(attackers, a)
				wg.Add(1)
				go func() {
					defer wg.Done()
					for k := range pipelined {
						off := uint64((i*pipelined+k)%2) * length
						if cmd == cmdWrite {
							a.send(cmd, uint64(k), off, length, payload)
						} else {
							a.send(cmd, uint64(k), off, length, nil)
						}
					}
				}()
			}
			// While the attackers push and wait, the good client is served.
			for i := range 20 {
				good.check(t, uint64(10+i))
				time.Sleep(50 * time.Millisecond)
			}
			peak := testenv.ProcStatus(t, pid, "VmHWM")
			t.Logf("idle RSS %d MiB, peak %d MiB during the flood", idle>>20, peak>>20)
			if peak > 512<<20 {
				t.Errorf("peak RSS %d MiB during the flood, want at most 512 MiB", peak>>20)
			}
			for _, a := range attackers {
				a.c.Close()
			}
			wg.Wait()
			var rss int64
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
				if rss = testenv.ProcStatus(t, pid, "VmRSS"); rss <= idle+64<<20 {
					break
				}
			}
			t.Logf("RSS %d MiB after the attackers left", rss>>20)
			if rss > idle+64<<20 {
				t.Errorf("RSS %d MiB 10 s after the flood, idle was %d MiB: want within 64 MiB", rss>>20, idle>>20)
			}
			good.check(t, 100)
			if err := d.stop(); err != nil {
				t.Errorf("daemon stop: %v", err)
			}
		})
	}
}

// The NBD commands the raw client sends.
const (
	cmdRead  = 0
	cmdWrite = 1
)

// rawExport is a minimal NBD client: the old EXPORT_NAME negotiation, then
// requests with simple replies, written and read separately so a test can
// pipeline requests and not read the replies.
type rawExport struct {
	c  net.Conn
	br *bufio.Reader
	mu sync.Mutex // send
}

func dialExport(t *testing.T, sock, name string) *rawExport {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	br := bufio.NewReader(c)
	hello := make([]byte, 18) // NBDMAGIC, IHAVEOPT, handshake flags
	if _, err := io.ReadFull(br, hello); err != nil {
		t.Fatal(err)
	}
	const fixedNewstyle, noZeroes, optExportName = 1, 2, 1
	msg := binary.BigEndian.AppendUint32(nil, fixedNewstyle|noZeroes)
	msg = append(msg, "IHAVEOPT"...)
	msg = binary.BigEndian.AppendUint32(msg, optExportName)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(name)))
	msg = append(msg, name...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(br, make([]byte, 10)); err != nil { // size, transmission flags
		t.Fatalf("export %q: %v", name, err)
	}
	return &rawExport{c: c, br: br}
}

// send writes one request; errors are ignored (an attacker's connection
// is closed under it at the end).
func (r *rawExport) send(cmd uint16, cookie, off uint64, length uint32, payload []byte) error {
	h := make([]byte, 28)
	binary.BigEndian.PutUint32(h, 0x25609513)
	binary.BigEndian.PutUint16(h[6:], cmd)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint64(h[16:], off)
	binary.BigEndian.PutUint32(h[24:], length)
	r.mu.Lock()
	defer r.mu.Unlock()
	bufs := net.Buffers{h, payload}
	_, err := bufs.WriteTo(r.c)
	return err
}

// reply reads a simple reply and, for a successful read, its data.
func (r *rawExport) reply(dataLen int) (errno uint32, cookie uint64, data []byte, err error) {
	h := make([]byte, 16)
	if _, err := io.ReadFull(r.br, h); err != nil {
		return 0, 0, nil, err
	}
	if m := binary.BigEndian.Uint32(h); m != 0x67446698 {
		return 0, 0, nil, fmt.Errorf("simple reply magic %#x", m)
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && dataLen > 0 {
		data = make([]byte, dataLen)
		_, err = io.ReadFull(r.br, data)
	}
	return errno, cookie, data, err
}

// check writes 4 KiB in the export's last MiB, which the attackers leave
// alone, and reads it back, each within 5 s.
func (r *rawExport) check(t *testing.T, cookie uint64) {
	t.Helper()
	r.c.SetDeadline(time.Now().Add(5 * time.Second))
	defer r.c.SetDeadline(time.Time{})
	p := bytes.Repeat([]byte{byte(cookie)}, 4096)
	const off = 65<<20 - 4096
	if err := r.send(cmdWrite, cookie, off, 4096, p); err != nil {
		t.Fatalf("good client, write %d: %v", cookie, err)
	}
	if errno, c, _, err := r.reply(0); err != nil || errno != 0 || c != cookie {
		t.Fatalf("good client, write %d: errno %d cookie %d err %v", cookie, errno, c, err)
	}
	if err := r.send(cmdRead, cookie, off, 4096, nil); err != nil {
		t.Fatalf("good client, read %d: %v", cookie, err)
	}
	errno, c, data, err := r.reply(4096)
	if err != nil || errno != 0 || c != cookie || !bytes.Equal(data, p) {
		t.Fatalf("good client, read %d: errno %d cookie %d err %v, data equal %v", cookie, errno, c, err, bytes.Equal(data, p))
	}
}
