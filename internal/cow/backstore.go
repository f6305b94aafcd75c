package cow

import (
	"errors"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// TEMPORARY until internal/backstore lands.
func createBackstore(f vfs.File, o storeOptions) (clusterStore, error) {
	return nil, errors.New("backstore not yet available")
}

func openBackstore(f vfs.File) (clusterStore, error) {
	return nil, errors.New("backstore not yet available")
}
