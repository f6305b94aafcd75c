// Command nbdsnap serves a block device over NBD and takes copy-on-write
// snapshots of it. See internal/cli for the commands.
package main

import (
	"os"

	"github.com/nbdsnap/nbdsnap/internal/cli"
)

// version is set at link time: go build -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() { os.Exit(cli.Main(version)) }
