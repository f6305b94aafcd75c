package daemon

import (
	"errors"
	"log/slog"
	"syscall"

	sdaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// setIOFlusher marks the process as an I/O flusher (PR_SET_IO_FLUSHER,
// Linux 5.6): its allocations do not recurse into filesystem or block I/O
// during memory reclaim. Without it, a daemon that serves a filesystem
// mounted on the same machine can deadlock: reclaim wants to write back
// dirty pages of that filesystem, which waits for this daemon, which waits
// for reclaim.
//
// The flag belongs to each thread and new threads inherit it from the
// thread that creates them. syscall.AllThreadsSyscall sets it on every
// thread the runtime has, so every later thread inherits it; it is not
// available in binaries linked with cgo, where the fallback covers only the
// calling thread. Best effort either way: it needs CAP_SYS_RESOURCE, and
// the outcome is logged.
func setIOFlusher(log *slog.Logger) {
	_, _, errno := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	if errno == 0 {
		log.Info("PR_SET_IO_FLUSHER set on all threads")
		return
	}
	if !errors.Is(errno, syscall.ENOTSUP) {
		log.Warn("PR_SET_IO_FLUSHER not set (needs CAP_SYS_RESOURCE); serving a filesystem mounted on this machine may deadlock under memory pressure", "err", errno)
		return
	}
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		log.Warn("PR_SET_IO_FLUSHER not set (needs CAP_SYS_RESOURCE); serving a filesystem mounted on this machine may deadlock under memory pressure", "err", err)
		return
	}
	log.Warn("PR_SET_IO_FLUSHER set on the calling thread only (binary built with cgo; build with CGO_ENABLED=0 to cover every thread)")
}

// notify tells systemd (Type=notify) about a state change; without
// NOTIFY_SOCKET it does nothing.
func notify(log *slog.Logger, state string) {
	if _, err := sdaemon.SdNotify(false, state); err != nil {
		log.Warn("sd_notify failed", "state", state, "err", err)
	}
}
