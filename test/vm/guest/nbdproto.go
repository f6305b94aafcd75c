package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// The little of the NBD protocol the agent speaks itself: the fixed-newstyle
// handshake with NBD_OPT_GO (to hand the kernel a negotiated socket on
// reconnection) and simple requests (to try a write on the wire). Constants
// are from the NBD protocol specification.
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic       = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic       = 0x0003e889045565a9
	nbdRequestMagic   = 0x25609513
	nbdSimpleReply    = 0x67446698
	nbdFlagFixedNew   = 1 << 0
	nbdFlagNoZeroes   = 1 << 1
	nbdOptGo          = 7
	nbdRepAck         = 1
	nbdRepInfo        = 3
	nbdInfoExport     = 0
	nbdCmdRead        = 0
	nbdCmdWrite       = 1
	nbdCmdDisc        = 2
	nbdFlagReadOnly   = 1 << 1 // transmission flag
	nbdRepErrBit      = 1 << 31
	nbdHandshakeLimit = 10 * time.Second
)

// nbdConn is a negotiated connection in the transmission phase.
type nbdConn struct {
	c     *net.UnixConn
	size  uint64
	flags uint16 // transmission flags
}

// dialNBD connects to a unix socket and selects an export with NBD_OPT_GO.
func dialNBD(sock, export string) (*nbdConn, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(nbdHandshakeLimit))
	n := &nbdConn{c: c}
	if err := n.handshake(export); err != nil {
		c.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", sock, err)
	}
	c.SetDeadline(time.Time{})
	return n, nil
}

func (n *nbdConn) handshake(export string) error {
	var hello struct {
		Magic, OptMagic uint64
		Flags           uint16
	}
	if err := binary.Read(n.c, binary.BigEndian, &hello); err != nil {
		return err
	}
	if hello.Magic != nbdMagic || hello.OptMagic != nbdOptMagic {
		return fmt.Errorf("not a newstyle server (magic %#x %#x)", hello.Magic, hello.OptMagic)
	}
	if hello.Flags&nbdFlagFixedNew == 0 {
		return errors.New("server is not fixed-newstyle")
	}
	client := uint32(nbdFlagFixedNew)
	if hello.Flags&nbdFlagNoZeroes != 0 {
		client |= nbdFlagNoZeroes
	}
	// NBD_OPT_GO: name length, name, no information requests.
	payload := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	payload = append(payload, export...)
	payload = binary.BigEndian.AppendUint16(payload, 0)
	msg := binary.BigEndian.AppendUint32(nil, client)
	msg = binary.BigEndian.AppendUint64(msg, nbdOptMagic)
	msg = binary.BigEndian.AppendUint32(msg, nbdOptGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(payload)))
	msg = append(msg, payload...)
	if _, err := n.c.Write(msg); err != nil {
		return err
	}
	for {
		var rep struct {
			Magic     uint64
			Opt, Type uint32
			Length    uint32
		}
		if err := binary.Read(n.c, binary.BigEndian, &rep); err != nil {
			return err
		}
		if rep.Magic != nbdRepMagic || rep.Opt != nbdOptGo || rep.Length > 1<<20 {
			return fmt.Errorf("bad option reply %+v", rep)
		}
		data := make([]byte, rep.Length)
		if _, err := io.ReadFull(n.c, data); err != nil {
			return err
		}
		switch {
		case rep.Type&nbdRepErrBit != 0:
			return fmt.Errorf("NBD_OPT_GO %q refused (reply %#x): %s", export, rep.Type, data)
		case rep.Type == nbdRepInfo && len(data) >= 12 && binary.BigEndian.Uint16(data) == nbdInfoExport:
			n.size = binary.BigEndian.Uint64(data[2:])
			n.flags = binary.BigEndian.Uint16(data[10:])
		case rep.Type == nbdRepAck:
			if n.size == 0 && n.flags == 0 {
				return errors.New("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		}
	}
}

// request sends one simple request and reads its simple reply, returning
// the NBD error number (0 for success) and, for a read, the data.
func (n *nbdConn) request(typ uint16, off uint64, length uint32, data []byte) (uint32, []byte, error) {
	n.c.SetDeadline(time.Now().Add(30 * time.Second))
	defer n.c.SetDeadline(time.Time{})
	const cookie = 0x6e6264736e6170
	msg := binary.BigEndian.AppendUint32(nil, nbdRequestMagic)
	msg = binary.BigEndian.AppendUint16(msg, 0)
	msg = binary.BigEndian.AppendUint16(msg, typ)
	msg = binary.BigEndian.AppendUint64(msg, cookie)
	msg = binary.BigEndian.AppendUint64(msg, off)
	msg = binary.BigEndian.AppendUint32(msg, length)
	msg = append(msg, data...)
	if _, err := n.c.Write(msg); err != nil {
		return 0, nil, err
	}
	var rep struct {
		Magic, Error uint32
		Cookie       uint64
	}
	if err := binary.Read(n.c, binary.BigEndian, &rep); err != nil {
		return 0, nil, err
	}
	if rep.Magic != nbdSimpleReply || rep.Cookie != cookie {
		return 0, nil, fmt.Errorf("bad reply %+v", rep)
	}
	if typ != nbdCmdRead || rep.Error != 0 {
		return rep.Error, nil, nil
	}
	buf := make([]byte, length)
	if _, err := io.ReadFull(n.c, buf); err != nil {
		return 0, nil, err
	}
	return 0, buf, nil
}

// disconnect sends NBD_CMD_DISC and closes.
func (n *nbdConn) disconnect() {
	msg := binary.BigEndian.AppendUint32(nil, nbdRequestMagic)
	msg = binary.BigEndian.AppendUint16(msg, 0)
	msg = binary.BigEndian.AppendUint16(msg, nbdCmdDisc)
	msg = append(msg, make([]byte, 8+8+4)...)
	n.c.Write(msg)
	n.c.Close()
}

// file returns a duplicate of the socket as an *os.File, for the kernel.
func (n *nbdConn) file() (*os.File, error) {
	return n.c.File()
}
