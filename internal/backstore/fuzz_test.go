package backstore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdsnap/nbdsnap/internal/vfs/vfstest"
)

func FuzzDecodeHeader(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "store-v1.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden[:headerSize])
	f.Add(golden[headerSize : 2*headerSize])
	f.Add(make([]byte, headerSize))
	v2, err := os.ReadFile(filepath.Join("testdata", "store-v2.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(v2[:headerSize])
	f.Add(v2[headerSize : 2*headerSize])
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			return
		}
		// Whatever decodes must encode back to the same bytes.
		again := make([]byte, headerSize)
		encodeHeader(&h, again)
		if !bytes.Equal(again, b[:headerSize]) {
			t.Fatalf("decode/encode changed the header")
		}
	})
}

func FuzzDecodeMetaBlock(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "store-v1.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden[8192:12288], uint32(16))
	f.Add(golden[12288:16384], uint32(16))
	f.Add(golden[12288:16384], uint32(2))
	f.Fuzz(func(t *testing.T, b []byte, maxClusters uint32) {
		m, err := decodeMetaBlock(b, 0, goldenUUID, maxClusters, true)
		if err != nil {
			return
		}
		for _, e := range m.entries {
			if e.cluster >= maxClusters {
				t.Fatalf("entry for cluster %d of %d accepted", e.cluster, maxClusters)
			}
		}
		again := make([]byte, blockSize)
		encodeMetaBlock(&m, again)
		if !bytes.Equal(again, b[:blockSize]) {
			t.Fatalf("decode/encode changed the block")
		}
	})
}

// FuzzOpen opens arbitrary bytes as a store. With reseal set, the fuzz
// function first repairs the CRC of both header slots and of every block
// that looks like a metadata block, so that the fuzzer reaches the
// recovery logic instead of stopping at checksums. Open and Check must
// not panic, and a store that opens must be readable: every cluster reads,
// or fails its checksum, which only a store Check finds fault with may do.
func FuzzOpen(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "store-v1.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden, false)
	unmarked, err := os.ReadFile(filepath.Join("testdata", "store-v1-unmarked.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(unmarked, false)
	f.Add(golden, true)
	f.Add(golden[:16384], true)
	v2, err := os.ReadFile(filepath.Join("testdata", "store-v2.golden"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(v2, false)
	f.Add(v2, true)
	f.Add([]byte("NBSSTORE"), false)
	f.Fuzz(func(t *testing.T, b []byte, reseal bool) {
		if len(b) > 4<<20 {
			return
		}
		b = bytes.Clone(b)
		if reseal {
			for off := 0; off+blockSize <= len(b); off += blockSize {
				if off < 2*headerSize || string(b[off:off+4]) == metaMagic {
					resealBlock(b[off : off+blockSize])
				}
			}
		}
		fs := vfstest.NewMemFS()
		file := openMem(t, fs, "s")
		if _, err := file.WriteAt(b, 0); err != nil {
			t.Fatal(err)
		}
		_, checkErr := Check(openMem(t, fs, "s"))
		s, err := Open(file, nil)
		if err != nil {
			return
		}
		defer s.Close()
		if checkErr != nil && s.Header().Persistent {
			// Open verifies less than Check (older batches' data), so
			// Check may fail on a store Open accepts — but only for data.
			rep, _ := Check(openMem(t, fs, "s"))
			if rep.Clusters != s.CopiedCount() {
				t.Fatalf("Open found %d clusters, Check %d (%v)", s.CopiedCount(), rep.Clusters, checkErr)
			}
		}
		buf := make([]byte, s.geo.clusterSize)
		s.ForEachCopied(func(c uint32) {
			_, err := s.ReadCluster(c, buf[:s.geo.clusterLen(c)], 0)
			switch {
			case err == nil:
			case errors.Is(err, ErrBookmark) && s.Header().Bookmark:
				// A bookmark has no data to read.
			case errors.Is(err, ErrChecksum) && checkErr != nil:
				// Data Open does not verify (older batches'), which
				// Check reported and every read refuses.
			default:
				t.Fatalf("read cluster %d: %v (check: %v)", c, err, checkErr)
			}
		})
	})
}

func resealBlock(b []byte) { reseal(b) }
