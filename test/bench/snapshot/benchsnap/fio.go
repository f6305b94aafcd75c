package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
)

// job is one fio workload. A timed job runs for the configured runtime (or,
// with runtime 0, one pass over the file); a pass job writes each of its
// blocks exactly once, which is what "first write into an uncopied cluster"
// needs, and is only capped in time.
type job struct {
	id    string
	title string
	unit  string // "IOPS" or "MiB/s"
	args  []string
	pass  bool
}

// fioParams are the sizes every job is run with.
type fioParams struct {
	size    int64 // bytes of the origin a timed job covers
	runtime int   // seconds per timed job; 0 = one pass
	cap     int   // seconds a pass job may take at most
}

func (j job) fioArgs(uri string, p fioParams) []string {
	a := []string{"--name=bench", "--ioengine=nbd", "--uri=" + uri, "--numjobs=1",
		"--output-format=json"}
	if !j.pass {
		a = append(a, "--size="+strconv.FormatInt(p.size, 10))
		if p.runtime > 0 {
			a = append(a, "--time_based", "--runtime="+strconv.Itoa(p.runtime), "--ramp_time=1")
		}
	} else if p.cap > 0 {
		a = append(a, "--runtime="+strconv.Itoa(p.cap))
	}
	return append(a, j.args...)
}

// runFio runs j against uri and returns its throughput in j.unit.
func runFio(ctx context.Context, uri string, j job, p fioParams) (float64, error) {
	cmd := exec.CommandContext(ctx, "fio", j.fioArgs(uri, p)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("fio %s on %s: %w: %s", j.id, uri, err, stderr.String())
	}
	// fio's nbd engine may print lines before the JSON document.
	if i := bytes.Index(out, []byte("\n{")); i >= 0 && !bytes.HasPrefix(out, []byte("{")) {
		out = out[i+1:]
	}
	var r struct {
		Jobs []struct {
			Error             int `json:"error"`
			Read, Write, Trim struct {
				IOBytes int64   `json:"io_bytes"`
				IOPS    float64 `json:"iops"`
				BW      float64 `json:"bw_bytes"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, fmt.Errorf("fio %s: output: %w", j.id, err)
	}
	if len(r.Jobs) != 1 || r.Jobs[0].Error != 0 {
		return 0, fmt.Errorf("fio %s on %s failed: %s", j.id, uri, out)
	}
	d := r.Jobs[0].Read
	if r.Jobs[0].Write.IOBytes > 0 {
		d = r.Jobs[0].Write
	}
	if r.Jobs[0].Trim.IOBytes > 0 {
		d = r.Jobs[0].Trim
	}
	if d.IOBytes == 0 {
		return 0, fmt.Errorf("fio %s on %s: no I/O done", j.id, uri)
	}
	if j.unit == "IOPS" {
		return d.IOPS, nil
	}
	return d.BW / (1 << 20), nil
}

// exportHash reads a whole NBD export with nbdcopy and returns its SHA-256.
func exportHash(ctx context.Context, uri string) (string, error) {
	cmd := exec.CommandContext(ctx, "nbdcopy", uri, "-")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", fmt.Errorf("nbdcopy: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("nbdcopy: %w", err)
	}
	h := sha256.New()
	_, cpErr := io.Copy(h, stdout)
	if err := cmd.Wait(); err != nil {
		return "", fmt.Errorf("nbdcopy %s: %w: %s", uri, err, stderr.String())
	}
	if cpErr != nil {
		return "", fmt.Errorf("nbdcopy %s: %w", uri, cpErr)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func fileHash(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
