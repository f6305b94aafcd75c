package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

type checkOptions struct {
	json     bool
	skipData bool
	progress bool
}

func newCheckCommand() *cobra.Command {
	o := &checkOptions{}
	cmd := &cobra.Command{
		Use:   "check BACKING",
		Short: "Validate a snapshot's backing store file",
		Long: `Read a backing store and validate it: both header slots, the metadata log and,
unless --skip-data, the checksum of every copied cluster. Nothing is written.
Run it on a store no daemon is using (a daemon writing it may be caught
mid-batch). Exits 1 if a problem is found.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := vfs.OS{}.OpenFile(args[0], os.O_RDONLY, 0)
			if err != nil {
				return fmt.Errorf("check: %w", err)
			}
			defer f.Close()
			opts := backstore.CheckOptions{SkipData: o.skipData}
			if o.progress {
				opts.Progress = progressPrinter(cmd.ErrOrStderr(), time.Now)
			}
			rep, cerr := backstore.CheckWithOptions(f, opts)
			out := cmd.OutOrStdout()
			if o.json {
				if err := writeJSON(out, rep); err != nil {
					return err
				}
			} else if rep.Header.Version != 0 { // a header was read
				fmt.Fprintln(out, checkLine(args[0], rep))
				for _, n := range rep.Notices {
					fmt.Fprintf(out, "  notice: %s\n", n)
				}
			}
			switch {
			case len(rep.Problems) > 0:
				return fmt.Errorf("%s: %d problem(s): %s", args[0], len(rep.Problems), strings.Join(rep.Problems, "; "))
			case cerr != nil:
				return fmt.Errorf("%s: %w", args[0], cerr)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&o.json, "json", false, "print the full report as JSON")
	cmd.Flags().BoolVar(&o.skipData, "skip-data", false, "do not read the copied clusters to verify their checksums")
	cmd.Flags().BoolVar(&o.progress, "progress", false, "report on stderr how many copied clusters have been verified (every 10% and every 5 seconds)")
	return cmd
}

// progressPrinter returns a CheckOptions.Progress that writes a line to w
// at each tenth of the clusters and at least every 5 seconds between, so
// that a check of a large store on a slow disk is seen to move, without a
// line per cluster.
func progressPrinter(w io.Writer, now func() time.Time) func(done, total int) {
	const every = 5 * time.Second
	last := now()
	step := 0
	return func(done, total int) {
		s := done * 10 / total
		if s == step && now().Sub(last) < every {
			return
		}
		step, last = s, now()
		fmt.Fprintf(w, "check: verified %d of %d copied clusters (%d%%)\n", done, total, done*100/total)
	}
}

func checkLine(path string, r backstore.Report) string {
	h := r.Header
	kind := "persistent"
	if r.Transient {
		kind = "transient"
	}
	s := fmt.Sprintf("%s: snapshot %s of origin %s (%s), taken %s, %s, %s clusters",
		path, h.Name, h.OriginID, formatSize(h.OriginSize), h.Created.UTC().Format("2006-01-02 15:04:05 MST"),
		kind, formatSize(int64(h.ClusterSize)))
	if !r.Transient {
		s += fmt.Sprintf(", %d copied, %d verified, batch %d", r.Clusters, r.DataVerified, r.CommittedBatch)
	}
	s += fmt.Sprintf(", %v", h.State)
	if h.Reason != "" {
		s += " (" + h.Reason + ")"
	}
	if len(r.Problems) == 0 {
		s += ", ok"
	}
	return s
}
