package nbdsrv

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// chunkReader returns data in reads of random lengths, some empty, then
// io.EOF.
type chunkReader struct {
	data []byte
	rng  *rand.Rand
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.data), c.rng.IntN(5000))
	n = copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

// Whatever mix of Read, Next and Resize consumes it, a connReader yields
// the source's bytes in order, and bytes handed out by Next survive a
// Resize untouched.
func TestConnReader(t *testing.T) {
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 1))
		src := make([]byte, 1+rng.IntN(200000))
		for i := range src {
			src[i] = byte(rng.Uint32())
		}
		b := newConnReader(&chunkReader{data: src, rng: rng}, 1<<(6+rng.IntN(10)))
		var got []byte
		var lent [][]byte // Next's slices, with what they must still hold
		var want [][]byte
		for {
			switch op := rng.IntN(10); {
			case op < 6:
				p := make([]byte, rng.IntN(3*len(b.buf)))
				n, err := io.ReadFull(b, p)
				got = append(got, p[:n]...)
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					goto done
				}
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
			case op < 8:
				if k := b.Buffered(); k > 0 {
					p := b.Next(1 + rng.IntN(k))
					got = append(got, p...)
					// Only a Resize keeps p valid past the next read.
					b.Resize(len(b.buf) * (1 + rng.IntN(2)))
					lent = append(lent, p)
					want = append(want, bytes.Clone(p))
				}
			default:
				b.Resize(1 + rng.IntN(1<<16))
			}
		}
	done:
		if !bytes.Equal(got, src) {
			t.Fatalf("seed %d: read %d bytes that differ from the %d of the source", seed, len(got), len(src))
		}
		for i := range lent {
			if !bytes.Equal(lent[i], want[i]) {
				t.Fatalf("seed %d: bytes handed out by Next changed after a Resize", seed)
			}
		}
	}
}
