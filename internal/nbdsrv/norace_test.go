//go:build !race

package nbdsrv

const raceEnabled = false
