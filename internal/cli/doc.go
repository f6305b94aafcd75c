// Package cli is the nbdsnap command line: a cobra tree with one file per
// command (serve, create, clear, status, list, version, man; cobra adds
// completion). main calls [Main]; tests call [Run] with their own streams.
//
// Each command keeps its flags in an options struct, validates them in one
// place, and writes through cmd.OutOrStdout() so tests can capture it.
// Client commands find their daemon with --control PATH or by the origin's
// name, --origin NAME or ORIGIN/SNAP as the snapshot argument (the socket
// /run/nbdsnap/ORIGIN.ctl); with neither, the one daemon under /run/nbdsnap
// if there is exactly one. --name is a hidden alias of --origin on the
// client commands (serve --name names the daemon). client.go resolves all
// this; args.go words the positional-argument errors.
//
// The version reported (version, --version, the daemon's status) is
// stamped into package main by the linker; see [Version].
//
// Exit codes: 0 success, 1 the operation failed, 2 the command line was
// wrong (unknown flag, missing argument, malformed size), 3 serve stopped
// but --stop-timeout forced the stop (snapshots invalidated, connections
// cut). Every error is one line on stderr, prefixed "nbdsnap: ".
package cli
