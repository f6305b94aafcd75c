package bytepool

import "testing"

func TestPool(t *testing.T) {
	p := New()
	for _, n := range []int{1, 4096, 4097, 1 << 20, 32 << 20} {
		b := p.Get(n)
		if len(*b) != n || cap(*b) < n || cap(*b) > max(2*n, 4096) {
			t.Errorf("Get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		p.Put(b)
	}
	if b := p.Get(64 << 20); len(*b) != 64<<20 {
		t.Errorf("oversize Get: %d", len(*b))
	}
	foreign := make([]byte, 5000)
	p.Put(&foreign) // not a class size: dropped, not pooled
	if b := p.Get(5000); cap(*b) != 8192 {
		t.Errorf("foreign buffer came back: cap %d", cap(*b))
	}
	p.Put(nil)
}
