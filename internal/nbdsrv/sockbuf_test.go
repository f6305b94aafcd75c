package nbdsrv

import (
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSizeSendBuffer: a unix-socket connection gets a send buffer that
// holds a whole large reply (the kernel reports twice what was set, its
// bookkeeping included); without CAP_NET_ADMIN the kernel may cap it at
// net.core.wmem_max, which the test accepts.
func TestSizeSendBuffer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("unix", path)
		if err == nil {
			defer c.Close()
			c.Read(make([]byte, 1))
		}
	}()
	nc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sizeSendBuffer(nc)
	rc, _ := nc.(*net.UnixConn).SyscallConn()
	var got int
	rc.Control(func(fd uintptr) { got, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) })
	if err != nil {
		t.Fatal(err)
	}
	if got < 2*unixSendBuffer && unix.Geteuid() == 0 {
		t.Fatalf("send buffer %d, want at least %d", got, 2*unixSendBuffer)
	}
	if got <= 212992 {
		t.Fatalf("send buffer %d: not raised above the default", got)
	}
}
