//go:build race

package nbdsrv

// raceEnabled: the race detector makes sync.Pool drop items on purpose.
const raceEnabled = true
