package backstore

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

// TestOnePrefix: errors wrapped through several layers of the package
// still read "backstore:" once, and name each header slot's problem once.
func TestOnePrefix(t *testing.T) {
	fs := vfstest.NewMemFS()
	s, err := Create(openMem(t, fs, "a"), testOptions())
	if err != nil {
		t.Fatal(err)
	}
	commitClusters(t, s, 1, 1, 2, 3)
	dup := s.Commit(makeBatch(s, 1, 1))
	commitClusters(t, s, 1, 4, 5)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f, _ := fs.OpenFile("a", os.O_RDWR, 0)
	h, err := Identify(f)
	if err != nil {
		t.Fatal(err)
	}
	// Damage the data of the last batch (clusters 4 and 5, slots 3 and 4).
	f.WriteAt([]byte{0xee, 0xee}, h.DataStart+3*512+100)
	_, damaged := Check(f)
	f.WriteAt(bytes.Repeat([]byte{0xff}, 2*headerSize), 0)
	_, wrecked := Open(f, nil)

	tests := []struct {
		name string
		err  error
		want string
	}{
		{"commit of a copied cluster", dup, "backstore: commit: bad cluster in batch: cluster 1 already copied"},
		{"check of damaged data", damaged, "backstore: check: store is corrupt: batch 2 (entries 3…4), committed before the last clean shutdown, is damaged: data slot 3 (cluster 4) fails its checksum; only entries 0…2, up to batch 1, are intact"},
		{"open of wrecked headers", wrecked, `backstore: open: no valid header slot (both: not a backing store: bad magic "\xff\xff\xff\xff\xff\xff\xff\xff")`},
	}
	for _, tt := range tests {
		if tt.err == nil || tt.err.Error() != tt.want || strings.Count(tt.err.Error(), "backstore:") != 1 {
			t.Errorf("%s: %v\nwant %s", tt.name, tt.err, tt.want)
		}
	}
}
