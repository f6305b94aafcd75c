//go:build !race

package backstore

const raceEnabled = false
