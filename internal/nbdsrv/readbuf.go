package nbdsrv

import "io"

// connReader is a connection's read buffer: bufio.Reader's job, plus two
// things the reader needs. Next hands out bytes in place, so that a WRITE
// run on the reader writes its payload straight from the buffer, without a
// copy into a pooled one; Resize moves the unread bytes to new memory, to
// grow the buffer of a busy connection and, when a request that may be
// writing from the old memory is taken over (tick), to leave that memory
// to it. The bytes Next returned stay valid until the next Read, Next or
// fill, and for good after a Resize.
type connReader struct {
	src  io.Reader
	buf  []byte
	r, w int   // unread bytes are buf[r:w]
	err  error // from src, returned once the buffer is drained
}

func newConnReader(src io.Reader, size int) *connReader {
	return &connReader{src: src, buf: make([]byte, size)}
}

// Buffered is the number of bytes that can be read without reading src.
func (b *connReader) Buffered() int { return b.w - b.r }

// Read reads from the buffer if it holds anything; else straight from src
// into p if p is at least as large as the buffer (a large payload is not
// copied twice); else through one read of src into the buffer.
func (b *connReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if b.r == b.w {
		if b.err != nil {
			err := b.err
			b.err = nil
			return 0, err
		}
		if len(p) >= len(b.buf) {
			return b.src.Read(p)
		}
		b.fill()
		if b.r == b.w {
			err := b.err
			b.err = nil
			return 0, err
		}
	}
	n := copy(p, b.buf[b.r:b.w])
	b.r += n
	return n, nil
}

// maxEmptyReads bounds reads of src that return neither data nor an error.
const maxEmptyReads = 100

// fill reads src once into the buffer's free space, after moving the
// unread bytes to its start.
func (b *connReader) fill() {
	if b.r > 0 {
		copy(b.buf, b.buf[b.r:b.w])
		b.w -= b.r
		b.r = 0
	}
	for range maxEmptyReads {
		n, err := b.src.Read(b.buf[b.w:])
		b.w += n
		if err != nil {
			b.err = err
			return
		}
		if n > 0 {
			return
		}
	}
	b.err = io.ErrNoProgress
}

// Next returns the next n unread bytes, in place, and consumes them. n must
// not exceed Buffered.
func (b *connReader) Next(n int) []byte {
	p := b.buf[b.r : b.r+n : b.r+n]
	b.r += n
	return p
}

// Resize moves the unread bytes into a new buffer of size bytes (or of
// their length, if larger). The old memory is not touched again.
func (b *connReader) Resize(size int) {
	nb := make([]byte, max(size, b.Buffered()))
	b.w = copy(nb, b.buf[b.r:b.w])
	b.r = 0
	b.buf = nb
}
