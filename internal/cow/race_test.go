//go:build race

package cow

// raceEnabled: the race detector slows memory-heavy code 5-10x, so timing
// targets are checked only without it.
const raceEnabled = true
