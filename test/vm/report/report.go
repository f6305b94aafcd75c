// Package report is the wire format between the guest agent and the host
// test: each scenario's outcome travels as one line on the VM's serial
// console, the prefix followed by a JSON object.
package report

import (
	"encoding/json"
	"strings"
)

// Prefix starts a result line. Kernel messages share the console, so a
// reader looks for the prefix anywhere in a line.
const Prefix = "NBDSNAP-VM-RESULT "

// BeginPrefix starts the line the agent prints before a scenario, followed
// by its name: the console from there to the scenario's result line is the
// scenario's own log.
const BeginPrefix = "NBDSNAP-VM-BEGIN "

// CmdlineKey names the scenarios on the kernel command line, comma
// separated, in the order to run them: nbdsnapvm=freeze,crash. Without a
// dot in the key the kernel leaves it alone.
const CmdlineKey = "nbdsnapvm"

// Result is one scenario's outcome.
type Result struct {
	Scenario string  `json:"scenario"`
	OK       bool    `json:"ok"`
	Error    string  `json:"error,omitempty"`
	Seconds  float64 `json:"seconds"`
	Steps    []Step  `json:"steps"`
}

// Step is one timed step of a scenario, for the report of where time went.
type Step struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// Line renders a result as a console line (without the newline).
func (r Result) Line() string {
	b, err := json.Marshal(r)
	if err != nil { // a struct of strings and numbers always marshals
		return Prefix + `{"ok":false,"error":"report: marshal failed"}`
	}
	return Prefix + string(b)
}

// Section returns the part of a console that belongs to one scenario: from
// its begin line to the end of its result line, or to the end of the
// console if it has none (the guest hung or crashed in it). It is empty if
// the scenario never began.
func Section(console, scenario string) string {
	marker := BeginPrefix + scenario
	begin := -1
	for off := 0; ; {
		i := strings.Index(console[off:], marker)
		if i < 0 {
			return ""
		}
		end := off + i + len(marker)
		// The serial console ends lines with \r\n.
		if end < len(console) && (console[end] == '\r' || console[end] == '\n') {
			begin = off + i
			break
		}
		off = end
	}
	rest := console[begin:]
	if i := strings.Index(rest, Prefix+`{"scenario":"`+scenario+`"`); i >= 0 {
		if j := strings.IndexByte(rest[i:], '\n'); j >= 0 {
			return rest[:i+j+1]
		}
	}
	return rest
}

// Parse finds the result lines in a console log, in order. A line whose
// JSON does not decode (a kernel message landed inside it) is returned as
// a failed result saying so, never dropped.
func Parse(console string) []Result {
	var out []Result
	for _, line := range strings.Split(console, "\n") {
		i := strings.Index(line, Prefix)
		if i < 0 {
			continue
		}
		var r Result
		if err := json.Unmarshal([]byte(strings.TrimSpace(line[i+len(Prefix):])), &r); err != nil {
			out = append(out, Result{OK: false, Error: "unreadable result line: " + line})
			continue
		}
		out = append(out, r)
	}
	return out
}
