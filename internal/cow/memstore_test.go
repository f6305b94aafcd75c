package cow

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// memStore is an in-memory clusterStore for tests that exercise the engine
// without a real backing store: it can fail chosen commits.
type memStore struct {
	mu      sync.Mutex
	hdr     storeHeader
	data    map[uint32][]byte
	order   []uint32 // clusters in commit order: entry numbers
	commits int
	// fail, if set, is asked before every commit (numbered from 1)
	// whether to fail it; the time it takes counts as the commit's sync.
	fail   func(n int) error
	closed bool
}

func newMemStore(o storeOptions) *memStore {
	return &memStore{
		hdr: storeHeader{
			UUID: fmt.Sprintf("mem-%s", o.Name), Name: o.Name, Created: o.Created,
			ClusterSize: o.ClusterSize, OriginSize: o.OriginSize, OriginID: o.OriginID,
			Persistent: o.Persistent, Valid: true, Bases: o.Bases,
		},
		data: make(map[uint32][]byte),
	}
}

func (m *memStore) commit(batch []storeCluster) (time.Duration, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, errors.New("memstore: closed")
	}
	m.commits++
	var syncTime time.Duration
	if m.fail != nil {
		start := time.Now()
		err := m.fail(m.commits)
		syncTime = time.Since(start)
		if err != nil {
			return syncTime, err
		}
	}
	for _, c := range batch {
		if len(c.data) != m.hdr.ClusterSize {
			return syncTime, fmt.Errorf("memstore: cluster %d has %d bytes", c.index, len(c.data))
		}
		if _, dup := m.data[c.index]; dup {
			return syncTime, fmt.Errorf("memstore: cluster %d committed twice", c.index)
		}
		m.data[c.index] = append([]byte(nil), c.data...)
		m.order = append(m.order, c.index)
	}
	return syncTime, nil
}

func (m *memStore) readCluster(index uint32, p []byte, off int) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false, errors.New("memstore: closed")
	}
	d, ok := m.data[index]
	if !ok {
		return false, nil
	}
	copy(p, d[off:])
	return true, nil
}

func (m *memStore) entry(index uint32) (uint32, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := slices.Index(m.order, index)
	return uint32(i), i >= 0
}

func (m *memStore) count() uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return uint32(len(m.order))
}

func (m *memStore) bookmark() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hdr.Bookmark = true
	return nil
}

func (m *memStore) forEachCopied(fn func(uint32)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.data {
		fn(i)
	}
}

func (m *memStore) header() storeHeader {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.hdr
}

func (m *memStore) invalidate(reason string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hdr.Valid, m.hdr.Reason = false, reason
	return nil
}

func (m *memStore) bytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data) * m.hdr.ClusterSize)
}

func (m *memStore) close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

func (m *memStore) release() error { return m.close() }
