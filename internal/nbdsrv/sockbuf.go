package nbdsrv

import (
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

// unixSendBuffer is the send buffer asked for a unix-socket connection.
// Linux's default (net.core.wmem_default, 208 KiB) is smaller than one
// large read reply, so writing a 1 MiB reply blocked the writer several
// times, each a trip through the network poller and the scheduler; a
// buffer that holds a whole reply spares that (measured in
// bench/results/2026-11-24T1426Z-snapread). The kernel then
// holds up to this much for a client that does not read, where the server
// would otherwise hold the same reply in its own buffer. TCP connections
// keep the kernel's autotuning, which a fixed size would turn off.
const unixSendBuffer = 1 << 20

// sizeSendBuffer sets the send buffer of a unix-socket connection:
// SO_SNDBUFFORCE where the process may (CAP_NET_ADMIN; it is not capped by
// net.core.wmem_max, whose default is the 208 KiB above), SO_SNDBUF
// otherwise. It is an optimisation: a failure leaves the default.
func sizeSendBuffer(nc net.Conn) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, unixSendBuffer)
		if errors.Is(err, unix.EPERM) {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, unixSendBuffer)
		}
	})
}
