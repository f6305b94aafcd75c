package cli

import (
	"fmt"
	"strings"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/control"
)

// snapshotLine renders one snapshot the way fssconfig -l -v does:
//
//	snap1: origin data, taken 2026-11-21 12:00:00 UTC, persistent, 64 KiB clusters, 1234/16384 copied, 77 MiB backing, valid, 12 GiB free for the store
func snapshotLine(s control.SnapshotInfo) string {
	var b strings.Builder
	taken := "at an unknown time" // a damaged record
	if !s.Created.IsZero() {
		taken = s.Created.UTC().Format("2006-01-02 15:04:05 MST")
	}
	fmt.Fprintf(&b, "%s: origin %s, taken %s, ", s.Name, s.Origin, taken)
	if s.Bookmark {
		b.WriteString("bookmark, ")
	}
	if s.Persistent {
		b.WriteString("persistent, ")
	} else {
		b.WriteString("transient, ")
	}
	if s.ClusterSize > 0 {
		fmt.Fprintf(&b, "%s clusters, ", formatSize(int64(s.ClusterSize)))
	}
	switch {
	case s.ClustersTotal > 0 && s.Bookmark:
		// A bookmark copies nothing: it counts the clusters written.
		fmt.Fprintf(&b, "%d/%d written since, ", s.ClustersCopied, s.ClustersTotal)
	case s.ClustersTotal > 0:
		fmt.Fprintf(&b, "%d/%d copied, ", s.ClustersCopied, s.ClustersTotal)
	}
	fmt.Fprintf(&b, "%s backing, %s", formatSize(s.BackingBytes), s.State)
	if s.Reason != "" {
		fmt.Fprintf(&b, " (%s)", s.Reason)
	}
	if s.State == control.StateValid && s.StoreFree >= 0 {
		fmt.Fprintf(&b, ", %s free for the store", formatSize(s.StoreFree))
	}
	if len(s.DiffBases) > 0 {
		fmt.Fprintf(&b, ", diff against %s", strings.Join(s.DiffBases, " "))
	}
	if s.Conns > 0 {
		fmt.Fprintf(&b, ", %d client(s)", s.Conns)
	}
	return b.String()
}

// daemonLine renders the daemon itself.
func daemonLine(st control.Status) string {
	return fmt.Sprintf("%s: origin %s (%s), serving %s, %d snapshot(s), %d client(s), up %s, version %s",
		st.Name, st.Origin, formatSize(st.OriginSize), strings.Join(st.Listen, " "),
		len(st.Snapshots), st.Conns, time.Since(st.Started).Round(time.Second), st.Version)
}
