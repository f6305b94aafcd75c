//go:build race

package backstore

// raceEnabled: the race detector slows the code under test several times,
// so timing assertions are loosened under it.
const raceEnabled = true
