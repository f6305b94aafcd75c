package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
	"github.com/nbdsnap/nbdsnap/test/powerloss/workload"
	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// TestPowerLoss records, in the VM, every write, FLUSH and FUA that reaches
// the disk holding an origin, its backing stores and the daemon's state
// (dm-log-writes), while the guest runs a workload through the kernel's NBD
// client; then, on the host, it rebuilds that disk as it was at chosen FLUSH
// and FUA entries of the log — each one a moment a power cut could have
// frozen — starts nbdsnap on it, and checks what the daemon promised (see
// checkPoint). The recordings (the disks and what the workload did) can be
// kept and checked again without the VM:
//
//	NBDSNAP_POWERLOSS_KEEP=DIR      keep the recordings in DIR (a failure keeps them anyway)
//	NBDSNAP_POWERLOSS_REPLAY=DIR    check the recordings in DIR, no VM
//	NBDSNAP_POWERLOSS_POINTS=N|all  crash points per recording (default 25; make crashtest: 200)
//	NBDSNAP_POWERLOSS_SEED=S        the seed of the workloads and of the sample of points
//	NBDSNAP_POWERLOSS_ENTRY=E       check log entry E only (with REPLAY and -run for one recording)
func TestPowerLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM and replays hundreds of crash points; not under -short")
	}
	for _, tool := range []string{"losetup", "mount", "umount", "e2fsck", "nbdcopy"} {
		testenv.RequireTool(t, tool)
	}
	seed := envUint(t, "NBDSNAP_POWERLOSS_SEED")
	points := powerLossPoints(t)
	t.Logf("seed %d (NBDSNAP_POWERLOSS_SEED=%d replays it), %s crash points per recording", seed, seed, pointsString(points))

	dir := os.Getenv("NBDSNAP_POWERLOSS_REPLAY")
	if dir == "" {
		dir = os.Getenv("NBDSNAP_POWERLOSS_KEEP")
		if dir != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
		} else {
			var err error
			if dir, err = os.MkdirTemp("/var/tmp", "nbdsnap-powerloss-"); err != nil {
				t.Fatal(err)
			}
			// Kept if anything failed, for NBDSNAP_POWERLOSS_REPLAY.
			t.Cleanup(func() {
				if !t.Failed() {
					os.RemoveAll(dir)
				}
			})
		}
		recordInVM(t, dir, powerLossSpecs(seed))
	}
	t.Logf("recordings in %s", dir)
	nbdsnap := buildHostNbdsnap(t)
	recs, err := loadRecordings(dir)
	if err != nil {
		t.Fatal(err)
	}
	only := -1
	if e := os.Getenv("NBDSNAP_POWERLOSS_ENTRY"); e != "" {
		if only, err = strconv.Atoi(e); err != nil {
			t.Fatalf("NBDSNAP_POWERLOSS_ENTRY=%q: %v", e, err)
		}
	}
	for _, r := range recs {
		t.Run(r.rec.Spec.Name(), func(t *testing.T) {
			t.Parallel()
			checkRecording(t, r, nbdsnap, points, seed, only, dir)
		})
	}
}

// powerLossSpecs are the recordings: both layouts, both workloads, 4K and
// 64K clusters. The origins are small (16 MiB), so that hundreds of crash
// points stay cheap.
func powerLossSpecs(seed uint64) []workload.Spec {
	token := make([]byte, 4)
	rand.Read(token)
	root := "/run/nbdsnap-pl/" + hex.EncodeToString(token)
	specs := []workload.Spec{
		{Layout: workload.LayoutRaw, ClusterSize: "4K", Workload: workload.Random},
		{Layout: workload.LayoutFile, ClusterSize: "64K", Workload: workload.Random},
		{Layout: workload.LayoutFile, ClusterSize: "4K", Workload: workload.Ext4},
		{Layout: workload.LayoutRaw, ClusterSize: "64K", Workload: workload.Ext4},
	}
	for i := range specs {
		specs[i].Index = i
		specs[i].Seed = seed + uint64(i)
		specs[i].OriginSize = 16 << 20
		specs[i].Root = root + "/" + specs[i].Name()
	}
	return specs
}

// The disks of recording i, in dir.
func diskPath(dir string, i int, role string) string {
	return filepath.Join(dir, fmt.Sprintf("pl%d-%s.img", i, role))
}

const (
	plDataSize   = 128 << 20
	plLogSize    = 2 << 30 // sparse; a recording writes a few hundred MiB
	plRecordSize = 16 << 20
)

// recordInVM boots the VM with three disks per recording and runs the
// guest's powerloss scenario, which leaves on each record disk what its
// workload did.
func recordInVM(t *testing.T, dir string, specs []workload.Spec) {
	qemu := testenv.RequireTool(t, "qemu-system-x86_64")
	for _, tool := range []string{"apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "xz", "ldd", "busybox", "mke2fs", "e2fsck", "nbd-client", "nbdkit", "dmsetup", "wipefs", "go"} {
		testenv.RequireTool(t, tool)
	}
	k, err := prepareKernel(t.Logf)
	if err != nil {
		t.Fatalf("guest kernel: %v", err)
	}
	initrd := filepath.Join(t.TempDir(), "initramfs.cpio")
	nbdsnapErr, err := buildInitramfs(t, k, initrd)
	if err == nil {
		err = nbdsnapErr
	}
	if err != nil {
		t.Fatalf("initramfs: %v", err)
	}
	var drives []drive
	for _, s := range specs {
		for _, d := range []struct {
			role string
			size int64
		}{{"data", plDataSize}, {"log", plLogSize}, {"record", plRecordSize}} {
			p := diskPath(dir, s.Index, d.role)
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, d.size); err != nil {
				t.Fatal(err)
			}
			drives = append(drives, drive{File: p, Serial: fmt.Sprintf("nbdsnap-pl-%d-%s", s.Index, d.role)})
		}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if err := writeDoc(diskPath(dir, s.Index, "record"), workload.SpecOffset, b); err != nil {
			t.Fatal(err)
		}
	}
	b := boot{Qemu: qemu, Kernel: k.Vmlinux, Initrd: initrd, Drives: drives,
		Timeout: 12 * time.Minute, Silence: consoleSilence,
		Append: []string{report.CmdlineKey + "=powerloss"}}
	began := time.Now()
	console, bootErr := b.run(context.Background())
	t.Logf("recording boot: %.1fs", time.Since(began).Seconds())
	if err := os.WriteFile(filepath.Join(dir, "console.log"), []byte(console), 0o644); err != nil {
		t.Error(err)
	}
	results := report.Parse(console)
	var r report.Result
	ok := len(results) == 1
	if ok {
		r = results[0]
	}
	judge(t, "powerloss", r, ok, console, bootErr)
	if t.Failed() {
		t.FailNow()
	}
}

// recording is one recording on the host: its disks and its record.
type recording struct {
	rec       workload.Record
	data, log string
}

func loadRecordings(dir string) ([]recording, error) {
	var out []recording
	for i := 0; ; i++ {
		p := diskPath(dir, i, "record")
		if _, err := os.Stat(p); err != nil {
			if i == 0 {
				return nil, fmt.Errorf("no recording in %s: %w", dir, err)
			}
			return out, nil
		}
		b, err := readDoc(p, workload.RecordOffset)
		if err != nil {
			return nil, fmt.Errorf("recording %d: the guest left no record: %w", i, err)
		}
		var r recording
		if err := json.Unmarshal(b, &r.rec); err != nil {
			return nil, fmt.Errorf("recording %d: %w", i, err)
		}
		r.data, r.log = diskPath(dir, i, "data"), diskPath(dir, i, "log")
		out = append(out, r)
	}
}

func writeDoc(path string, off int64, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := workload.WriteDoc(f, off, b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func readDoc(path string, off int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := workload.ReadDoc(f, off)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// buildHostNbdsnap builds the daemon from this checkout for the host-side
// checks, as the guest's was built.
func buildHostNbdsnap(t *testing.T) string {
	bin := filepath.Join(t.TempDir(), "nbdsnap")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "github.com/nbdsnap/nbdsnap/cmd/nbdsnap")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build nbdsnap: %v\n%s", err, out)
	}
	return bin
}

func envUint(t *testing.T, name string) uint64 {
	v := os.Getenv(name)
	if v == "" {
		return uint64(time.Now().UnixNano()) & (1<<32 - 1)
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

// powerLossPoints is how many crash points each recording checks; 0 means
// all of them.
func powerLossPoints(t *testing.T) int {
	switch v := os.Getenv("NBDSNAP_POWERLOSS_POINTS"); v {
	case "":
		return 25
	case "all":
		return 0
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("NBDSNAP_POWERLOSS_POINTS=%q: a positive number or all", v)
		}
		return n
	}
}

func pointsString(n int) string {
	if n == 0 {
		return "all"
	}
	return strconv.Itoa(n)
}
