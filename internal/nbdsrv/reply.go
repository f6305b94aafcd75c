package nbdsrv

import "encoding/binary"

// request is one admitted transmission request, from the reader through its
// handler to the reply writer. Requests and their payload buffers are
// pooled; a request belongs to exactly one goroutine at a time.
type request struct {
	reqInfo
	cookie uint64
	buf    *[]byte // pooled: WRITE payload, READ data or BLOCK_STATUS chunks
	// data is a WRITE's payload: *buf, or bytes of the connection's read
	// buffer for a write run on the reader.
	data     []byte
	cost     int64 // bytes held in the connection's budget
	errno    Errno
	reason   string // why errno; sent as the structured error message
	hole     bool   // READ data was all zeros: send OFFSET_HOLE
	ioFailed bool   // errno came from the backend, not from validate

	// What the writer sends: out (a header in hdr) then payload.
	out     []byte
	payload []byte
	hdr     [structReplyLen + 4 + 2 + maxErrMsg + 8]byte
}

// maxErrMsg bounds the human-readable message of an error chunk.
const maxErrMsg = 128

// streamed reports whether r is a READ answered a piece at a time.
func (r *request) streamed() bool { return r.cmd == CmdRead && r.length > readChunk }

func (r *request) reset() {
	*r = request{hdr: r.hdr}
}

// setReply lays out the reply for r after its I/O: never before the data is
// in hand, so a failed read is an error reply and not a success header
// followed by garbage.
func (c *conn) setReply(r *request) {
	if !c.structured {
		h := r.hdr[:simpleReplyLen]
		binary.BigEndian.PutUint32(h[0:], magicSimpleReply)
		binary.BigEndian.PutUint32(h[4:], uint32(r.errno))
		binary.BigEndian.PutUint64(h[8:], r.cookie)
		r.out = h
		if r.errno == 0 && r.cmd == CmdRead {
			r.payload = *r.buf
		}
		return
	}
	if r.errno != 0 {
		msg := r.reason
		if len(msg) > maxErrMsg {
			msg = msg[:maxErrMsg]
		}
		typ, extra := ReplyError, 0
		if r.cmd == CmdRead && r.ioFailed {
			// The offset is the request's: the backend reports a failed
			// range, not the first bad byte, and no data was sent. Only for
			// I/O errors: the offset must lie inside the request, which a
			// refused request (say, zero length) need not have.
			typ, extra = ReplyErrorOffset, 8
		}
		n := structReplyLen + 4 + 2 + len(msg) + extra
		h := r.hdr[:n]
		putChunkHeader(h, replyFlagDone, typ, r.cookie, n-structReplyLen)
		binary.BigEndian.PutUint32(h[20:], uint32(r.errno))
		binary.BigEndian.PutUint16(h[24:], uint16(len(msg)))
		copy(h[26:], msg)
		if extra != 0 {
			binary.BigEndian.PutUint64(h[26+len(msg):], r.off)
		}
		r.out = h
		return
	}
	switch r.cmd {
	case CmdRead:
		if r.streamed() {
			// The whole data in one chunk that is not the last: a piece
			// read later may fail, and then only closing the connection is
			// left (see streamRest).
			h := r.hdr[:structReplyLen+8]
			putChunkHeader(h, 0, ReplyOffsetData, r.cookie, 8+int(r.length))
			binary.BigEndian.PutUint64(h[20:], r.off)
			r.out = h
			r.payload = *r.buf
			return
		}
		if r.hole {
			h := r.hdr[:structReplyLen+12]
			putChunkHeader(h, replyFlagDone, ReplyOffsetHole, r.cookie, 12)
			binary.BigEndian.PutUint64(h[20:], r.off)
			binary.BigEndian.PutUint32(h[28:], r.length)
			r.out = h
			return
		}
		h := r.hdr[:structReplyLen+8]
		putChunkHeader(h, replyFlagDone, ReplyOffsetData, r.cookie, 8+int(r.length))
		binary.BigEndian.PutUint64(h[20:], r.off)
		r.out = h
		r.payload = *r.buf
	case CmdBlockStatus:
		r.payload = *r.buf // chunks built by blockStatus
	default:
		h := r.hdr[:structReplyLen]
		putChunkHeader(h, replyFlagDone, ReplyNone, r.cookie, 0)
		r.out = h
	}
}

// putChunkHeader writes a structured reply chunk header:
// magic, flags, type, cookie, payload length.
func putChunkHeader(h []byte, flags uint16, typ ReplyType, cookie uint64, length int) {
	binary.BigEndian.PutUint32(h[0:], magicStructReply)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], uint16(typ))
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint32(h[16:], uint32(length))
}
