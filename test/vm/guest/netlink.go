package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The kernel NBD driver's generic-netlink interface (linux/nbd-netlink.h),
// the part the agent needs: NBD_CMD_RECONFIGURE with a dead-connection
// timeout and a new socket.
const (
	nbdGenlName             = "nbd"
	nbdGenlVersion          = 1
	nbdCmdReconfigure       = 3
	nbdAttrIndex            = 1
	nbdAttrSockets          = 7
	nbdAttrDeadConnTimeout  = 8
	nbdSockItem             = 1
	nbdSockFD               = 1
	netlinkReplyBufferBytes = 65536
)

// genl is a generic netlink socket.
type genl struct {
	fd  int
	seq uint32
}

func openGenl() (*genl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &genl{fd: fd}, nil
}

func (g *genl) close() { unix.Close(g.fd) }

// attr encodes one netlink attribute, padded to 4 bytes.
func attr(typ uint16, payload []byte) []byte {
	b := binary.LittleEndian.AppendUint16(nil, uint16(4+len(payload)))
	b = binary.LittleEndian.AppendUint16(b, typ)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func u32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// call sends one request with NLM_F_ACK and returns the payloads of the
// replies before the acknowledgement; a negative errno in the
// acknowledgement is returned as an error.
func (g *genl) call(family uint16, cmd uint8, version uint8, attrs []byte) ([][]byte, error) {
	g.seq++
	body := append([]byte{cmd, version, 0, 0}, attrs...)
	msg := binary.LittleEndian.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(body)))
	msg = binary.LittleEndian.AppendUint16(msg, family)
	msg = binary.LittleEndian.AppendUint16(msg, unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = binary.LittleEndian.AppendUint32(msg, g.seq)
	msg = binary.LittleEndian.AppendUint32(msg, 0)
	msg = append(msg, body...)
	if err := unix.Sendto(g.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("netlink send: %w", err)
	}
	var replies [][]byte
	buf := make([]byte, netlinkReplyBufferBytes)
	for {
		n, _, err := unix.Recvfrom(g.fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("netlink parse: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != g.seq {
				continue
			}
			if m.Header.Type == unix.NLMSG_ERROR {
				if len(m.Data) < 4 {
					return nil, fmt.Errorf("netlink: short error message")
				}
				if errno := int32(binary.LittleEndian.Uint32(m.Data)); errno != 0 {
					return nil, syscall.Errno(-errno)
				}
				return replies, nil
			}
			// m.Data points into buf, which the next receive reuses.
			replies = append(replies, append([]byte(nil), m.Data...))
		}
	}
}

// family resolves a generic netlink family name to its id.
func (g *genl) family(name string) (uint16, error) {
	replies, err := g.call(unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, 1,
		attr(unix.CTRL_ATTR_FAMILY_NAME, append([]byte(name), 0)))
	if err != nil {
		return 0, fmt.Errorf("netlink family %q: %w", name, err)
	}
	for _, r := range replies {
		attrs := r[4:] // after the genl header
		for len(attrs) >= 4 {
			l := int(binary.LittleEndian.Uint16(attrs))
			typ := binary.LittleEndian.Uint16(attrs[2:])
			if l < 4 || l > len(attrs) {
				break
			}
			if typ == unix.CTRL_ATTR_FAMILY_ID && l >= 6 {
				return binary.LittleEndian.Uint16(attrs[4:]), nil
			}
			attrs = attrs[(l+3)&^3:]
		}
	}
	return 0, fmt.Errorf("netlink family %q: no id in the reply", name)
}

// nbdReconfigure sends NBD_CMD_RECONFIGURE for /dev/nbd<index>: a new dead
// connection timeout if deadConnTimeout > 0, a new socket if sock != nil.
func nbdReconfigure(index int, deadConnTimeout uint64, sock *os.File) error {
	g, err := openGenl()
	if err != nil {
		return err
	}
	defer g.close()
	fam, err := g.family(nbdGenlName)
	if err != nil {
		return err
	}
	attrs := attr(nbdAttrIndex, u32(uint32(index)))
	if deadConnTimeout > 0 {
		attrs = append(attrs, attr(nbdAttrDeadConnTimeout, u64(deadConnTimeout))...)
	}
	if sock != nil {
		item := attr(nbdSockItem|unix.NLA_F_NESTED, attr(nbdSockFD, u32(uint32(sock.Fd()))))
		attrs = append(attrs, attr(nbdAttrSockets|unix.NLA_F_NESTED, item)...)
	}
	if _, err := g.call(fam, nbdCmdReconfigure, nbdGenlVersion, attrs); err != nil {
		return fmt.Errorf("NBD_CMD_RECONFIGURE nbd%d: %w", index, err)
	}
	return nil
}
