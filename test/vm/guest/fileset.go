package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// fsModel is what a directory tree must hold: each regular file's path,
// relative to the tree's root, and its exact contents. Directories follow
// from the files; lost+found is not part of the model.
type fsModel map[string][]byte

func (m fsModel) clone() fsModel {
	c := make(fsModel, len(m))
	for k, v := range m {
		c[k] = append([]byte(nil), v...)
	}
	return c
}

// sorted returns the model's paths under a prefix, sorted, so that every
// run mutates the same files.
func (m fsModel) sorted(prefix string) []string {
	var ps []string
	for p := range m {
		if strings.HasPrefix(p, prefix) {
			ps = append(ps, p)
		}
	}
	sort.Strings(ps)
	return ps
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// writeSet writes n new files under root/tag, in a few directories, with
// sizes from a few bytes (inline in the inode) to 768 KiB, and records
// them in the model.
func writeSet(root, tag string, n int, seed uint64, m fsModel) error {
	r := rand.New(rand.NewPCG(seed, 1))
	for i := 0; i < n; i++ {
		size := 4096 * (1 + r.IntN(192))
		if i%8 == 0 {
			size = r.IntN(3000)
		}
		rel := fmt.Sprintf("%s/d%d/f%03d", tag, i%4, i)
		data := randomBytes(r, size)
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, rel)), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(root, rel), data, 0o644); err != nil {
			return err
		}
		m[rel] = data
	}
	return nil
}

// mutate changes the files of one set the way set B's writes do in the
// scenarios: every fourth file deleted, the next one overwritten in place
// (64 KiB at a fixed offset, or the whole file if smaller), the next one
// appended to. Overwrites and appends land in clusters the snapshot must
// preserve.
func mutate(root, tag string, seed uint64, m fsModel) error {
	r := rand.New(rand.NewPCG(seed, 2))
	for i, rel := range m.sorted(tag + "/") {
		p := filepath.Join(root, rel)
		switch i % 4 {
		case 0:
			if err := os.Remove(p); err != nil {
				return err
			}
			delete(m, rel)
		case 1:
			if err := overwrite(p, m, rel, r); err != nil {
				return err
			}
		case 2:
			extra := randomBytes(r, 4096+r.IntN(65536))
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				return err
			}
			if _, err := f.Write(extra); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			m[rel] = append(m[rel], extra...)
		}
	}
	return nil
}

// overwrite rewrites up to 64 KiB in the middle of a file, in place, and
// updates the model.
func overwrite(p string, m fsModel, rel string, r *rand.Rand) error {
	old := m[rel]
	n := min(len(old), 64<<10)
	off := (len(old) - n) / 2
	data := randomBytes(r, n)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, int64(off)); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	updated := append([]byte(nil), old...)
	copy(updated[off:], data)
	m[rel] = updated
	return nil
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// checkTree compares a mounted tree with a model: the same regular files
// with the same SHA-256, nothing missing and nothing more. The error lists
// the first differences.
func checkTree(root string, m fsModel) error {
	var diffs []string
	seen := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			if rel == "lost+found" {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			diffs = append(diffs, rel+": not a regular file")
			return nil
		}
		seen[rel] = true
		want, ok := m[rel]
		if !ok {
			diffs = append(diffs, rel+": present but must not be")
			return nil
		}
		got, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			diffs = append(diffs, fmt.Sprintf("%s: sha256 %s (%d bytes), want %s (%d bytes)", rel, digest(got)[:16], len(got), digest(want)[:16], len(want)))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk %s: %w", root, err)
	}
	for _, rel := range m.sorted("") {
		if !seen[rel] {
			diffs = append(diffs, rel+": missing")
		}
	}
	if len(diffs) > 0 {
		if len(diffs) > 12 {
			diffs = append(diffs[:12], fmt.Sprintf("... and %d more", len(diffs)-12))
		}
		return fmt.Errorf("%s differs from the model in %d files:\n%s", root, len(diffs), strings.Join(diffs, "\n"))
	}
	return nil
}

// bytes is the total size of the model's files, for the log.
func (m fsModel) bytes() int {
	n := 0
	for _, v := range m {
		n += len(v)
	}
	return n
}
