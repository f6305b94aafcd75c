package vm

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/test/vm/report"
)

// fakeBzImage lays out a bzImage the way the boot protocol describes it:
// setup sectors, then the protected-mode code holding the payload at
// payload_offset, followed by the 4-byte size the kernel build appends.
func fakeBzImage(t *testing.T, setupSects byte, payload []byte) []byte {
	t.Helper()
	setup := int(setupSects)
	if setup == 0 {
		setup = 4
	}
	const payloadOffset = 0x3a0
	img := make([]byte, (setup+1)*512+payloadOffset+len(payload)+4)
	img[0x1f1] = setupSects
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(img[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(img[0x248:], payloadOffset)
	binary.LittleEndian.PutUint32(img[0x24c:], uint32(len(payload)+4))
	copy(img[(setup+1)*512+payloadOffset:], payload)
	return img
}

func gz(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestExtractVmlinux(t *testing.T) {
	elf := append([]byte("\x7fELF"), bytes.Repeat([]byte("kernel"), 1000)...)
	for _, sects := range []byte{0, 31} {
		got, err := extractVmlinux(fakeBzImage(t, sects, gz(t, elf)))
		if err != nil {
			t.Fatalf("setup_sects %d: %v", sects, err)
		}
		if !bytes.Equal(got, elf) {
			t.Fatalf("setup_sects %d: extracted %d bytes, not the ELF", sects, len(got))
		}
	}
	bad := []struct {
		name string
		img  []byte
		want string
	}{
		{"no header", make([]byte, 4096), "no bzImage boot header"},
		{"not ELF", fakeBzImage(t, 4, gz(t, []byte("MZ not an elf"))), "not an ELF"},
		{"lz4", fakeBzImage(t, 4, []byte{0x02, 0x21, 0x4c, 0x18, 0, 0}), "not handled"},
	}
	for _, c := range bad {
		if _, err := extractVmlinux(c.img); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one saying %q", c.name, err, c.want)
		}
	}
	trunc := fakeBzImage(t, 4, gz(t, elf))
	binary.LittleEndian.PutUint32(trunc[0x24c:], uint32(len(trunc)))
	if _, err := extractVmlinux(trunc); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("payload past the end: error %v", err)
	}
}

// readCpio parses a newc archive back: name -> (mode, body).
func readCpio(t *testing.T, b []byte) map[string][2]string {
	t.Helper()
	out := map[string][2]string{}
	for off := 0; ; {
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("offset %d: magic %q", off, h[:6])
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+namesize-1])
		off += (110 + namesize + 3) &^ 3
		body := string(b[off : off+size])
		off += (size + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out[name] = [2]string{strconv.FormatUint(uint64(mode), 8), body}
	}
}

func TestArchive(t *testing.T) {
	a := newArchive()
	a.file("usr/bin/tool", 0o755, []byte("binary"))
	a.symlink("usr/bin/sh", "/usr/bin/busybox")
	a.symlink("usr/bin/tool", "/usr/bin/busybox") // taken: a real binary wins
	a.file("/init", 0o755, []byte("#!/bin/sh\n"))
	var buf bytes.Buffer
	if err := a.write(&buf); err != nil {
		t.Fatal(err)
	}
	got := readCpio(t, buf.Bytes())
	want := map[string][2]string{
		"usr":          {"40755", ""},
		"usr/bin":      {"40755", ""},
		"usr/bin/tool": {"100755", "binary"},
		"usr/bin/sh":   {"120777", "/usr/bin/busybox"},
		"init":         {"100755", "#!/bin/sh\n"},
	}
	if len(got) != len(want) {
		t.Fatalf("archive holds %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %v, want %v", k, got[k], v)
		}
	}
}

func TestReportParse(t *testing.T) {
	ok := report.Result{Scenario: "freeze", OK: true, Seconds: 1.5, Steps: []report.Step{{Name: "serve", Seconds: 0.5}}}
	console := "SeaBIOS\n[ 1.0] kernel line\n" + ok.Line() + "\r\n" +
		"junk " + report.Prefix + "{\"scenario\":\"x\",[  2.0] interleaved kernel message\n"
	got := report.Parse(console)
	if len(got) != 2 {
		t.Fatalf("parsed %d results, want 2: %+v", len(got), got)
	}
	if got[0].Scenario != "freeze" || !got[0].OK || len(got[0].Steps) != 1 {
		t.Errorf("first result %+v", got[0])
	}
	if got[1].OK || !strings.Contains(got[1].Error, "unreadable") {
		t.Errorf("a garbled line must come back as a failure, got %+v", got[1])
	}
	if sec := report.Section("boot\r\n"+report.BeginPrefix+"freeze\r\nstep\r\n"+ok.Line()+"\r\n"+report.BeginPrefix+"crash\r\nhung", "freeze"); !strings.HasPrefix(sec, report.BeginPrefix+"freeze") || !strings.HasSuffix(sec, ok.Line()+"\r\n") {
		t.Errorf("section of freeze: %q", sec)
	}
	if sec := report.Section(report.BeginPrefix+"freeze\n"+report.BeginPrefix+"crash\nhung", "crash"); sec != report.BeginPrefix+"crash\nhung" {
		t.Errorf("section of a scenario without result: %q", sec)
	}
	if sec := report.Section(report.BeginPrefix+"crashed\n", "crash"); sec != "" {
		t.Errorf("section of a scenario that never began: %q", sec)
	}
}

// TestBootSilence runs boot.run on a stand-in for QEMU that prints and then
// hangs: the silence watchdog must kill it and say why.
func TestBootSilence(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "qemu")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho booting\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	console, err := boot{Qemu: fake, Timeout: time.Minute, Silence: time.Second}.run(context.Background())
	if !errors.Is(err, errSilent) {
		t.Fatalf("error %v, want one wrapping errSilent", err)
	}
	if !strings.Contains(console, "booting") {
		t.Errorf("console %q lost what was printed", console)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("took %v to notice 1s of silence", d)
	}
}
