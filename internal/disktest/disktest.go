// Package disktest records what is on disk, for tests that assert a refused
// operation changed nothing, and fills file systems, for tests of what
// happens when one is full.
package disktest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// Tree maps every directory, socket and regular file under some roots to
// "dir", "socket" or the SHA-256 of its content.
type Tree map[string]string

// Record walks the roots. A file that disappears during the walk is left
// out; any other read error fails the test.
func Record(t testing.TB, roots ...string) Tree {
	t.Helper()
	m := Tree{}
	for _, root := range roots {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			switch {
			case d.IsDir():
				m[p] = "dir"
			case d.Type()&fs.ModeSocket != 0:
				m[p] = "socket"
			case d.Type().IsRegular():
				sum, err := HashFile(p)
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				if err != nil {
					t.Fatalf("disktest: %v", err)
				}
				m[p] = sum
			}
			return nil
		})
	}
	return m
}

// HashFile returns the hex sha256 of a file's content.
func HashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Unchanged reports every entry of before that changed or vanished in
// after, and every entry that appeared.
func (before Tree) Unchanged(t testing.TB, after Tree) {
	t.Helper()
	for p, v := range before {
		if after[p] != v {
			t.Errorf("%s changed: %.12q → %.12q", p, v, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
}

// Fill writes path until its file system is full (ENOSPC).
func Fill(t testing.TB, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill %s: %v", path, err)
			}
			return
		}
	}
}
