// Package daemon: under construction, see docs/design/2026-11-21-architecture.md.
package daemon
