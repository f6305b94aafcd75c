// Command nbdsnap-pprof is the nbdsnap CLI with a net/http/pprof listener on
// the address in NBDSNAP_PPROF (e.g. 127.0.0.1:6060), so that the daemon can
// be profiled under the benchmark's workloads without a hook in its code:
//
//	NBDSNAP_PPROF=127.0.0.1:6060 nbdsnap-pprof serve ...
//	go tool pprof -seconds 10 http://127.0.0.1:6060/debug/pprof/profile
package main

import (
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // registers /debug/pprof on http.DefaultServeMux
	"os"

	"github.com/nbdsnap/nbdsnap/internal/cli"
)

func main() {
	if addr := os.Getenv("NBDSNAP_PPROF"); addr != "" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbdsnap-pprof: %v\n", err)
			os.Exit(1)
		}
		// The listener lives as long as the process: a profiling aid only.
		go http.Serve(l, nil) //nolint:errcheck // ends with the process
	}
	os.Exit(cli.Main("bench-pprof"))
}
