package nbdsrv

import "errors"

// Sentinel errors of the package.
var (
	// ErrExportExists is returned by AddExport for a name already served.
	ErrExportExists = errors.New("nbdsrv: export already exists")
	// ErrExportBusy is returned by RemoveExport(name, false) while a client
	// has the export open.
	ErrExportBusy = errors.New("nbdsrv: export has open connections")
	// ErrNoExport is returned for a name that is not served.
	ErrNoExport = errors.New("nbdsrv: no such export")
	// ErrInvalidExport is wrapped by AddExport when an Export is unusable.
	ErrInvalidExport = errors.New("nbdsrv: invalid export")
	// ErrNotFast is returned by a Zeroer asked for a fast zero it cannot do;
	// the client gets NBD_ENOTSUP.
	ErrNotFast = errors.New("nbdsrv: cannot zero fast")
	// ErrServerClosed is returned by Serve after Shutdown.
	ErrServerClosed = errors.New("nbdsrv: server closed")
)
