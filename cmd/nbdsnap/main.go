// Command nbdsnap serves a block device over NBD and takes copy-on-write
// snapshots of it. See internal/cli for the commands.
package main

import (
	"os"

	"github.com/nbdsnap/nbdsnap/internal/cli"
)

// version is set by the linker, and by nothing else: make build runs
// go build -ldflags "-X main.version=$(git describe --tags --always --dirty)".
// It is the module's one package-level variable. Empty, cli.Version falls
// back to the version the go command recorded, then "devel".
var version string

func main() { os.Exit(cli.Main(version)) }
