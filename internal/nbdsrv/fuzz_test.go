package nbdsrv

import (
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/nbdsnap/nbdsnap/internal/testenv"
)

// The fuzz targets feed arbitrary bytes through net.Pipe into a server with
// a memory backend and check: no panic (a recovered one is logged and
// fails the input), no hang (the connection ends within seconds of the
// client closing), and bounded allocation per input.

const fuzzAllocLimit = 64 << 20

func optBytes(opt Opt, data []byte) []byte {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b, magicIHaveOpt)
	binary.BigEndian.PutUint32(b[8:], uint32(opt))
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	return append(b, data...)
}

func reqBytes(cmd Cmd, flags CmdFlags, cookie, off uint64, length uint32, payload []byte) []byte {
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], uint16(flags))
	binary.BigEndian.PutUint16(b[6:], uint16(cmd))
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// fuzzServe runs one connection over the given client bytes.
func fuzzServe(t *testing.T, input []byte) {
	logs := &testenv.SyncBuffer{}
	s := NewServer(Config{
		Logger:             newTestLogger(logs),
		MaxRequestsPerConn: 8,
		MaxBytesPerConn:    4 << 20,
		HandshakeTimeout:   5 * time.Second,
	})
	m := newMem(1 << 20)
	m.setExtents([]Extent{{4096, 0}, {65536, ExtentHole | ExtentZero}, {1<<20 - 69632, 0}})
	if err := s.AddExport(Export{Name: "a", Size: 1 << 20, Backend: m,
		MetaContexts: []MetaContext{staticContext{name: "qemu:dirty-bitmap:x", exts: []Extent{{1 << 19, 1}, {1 << 19, 0}}}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(Export{Name: "ro", Size: 1<<20 + 100, Backend: readOnlyMem{m}, MinBlock: 512, MaxBlock: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	s.SetDefaultExport("a")

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cli, srv := net.Pipe()
	done := make(chan struct{})
	go func() {
		s.serveConn(srv)
		close(done)
	}()
	go io.Copy(io.Discard, cli)
	cli.SetDeadline(time.Now().Add(10 * time.Second))
	cli.Write(input) // an error means the server closed: fine
	cli.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("connection did not end after the client closed")
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > fuzzAllocLimit {
		t.Fatalf("input of %d bytes allocated %d bytes", len(input), d)
	}
	if contains(logs.String(), "nbd: panic") {
		t.Fatalf("panic:\n%s", logs.String())
	}
}

var clientFlags = []byte{0, 0, 0, 3}

func FuzzOptions(f *testing.F) {
	f.Add(cat(clientFlags, optBytes(OptGo, nameAndInfos("a", InfoName, InfoBlockSize))))
	f.Add(cat(clientFlags, optBytes(OptList, nil), optBytes(OptInfo, nameAndInfos("ro", InfoDescription)), optBytes(OptAbort, nil)))
	f.Add(cat(clientFlags, optBytes(OptStructuredReply, nil), optBytes(OptListMetaContext, metaPayload("a")),
		optBytes(OptSetMetaContext, metaPayload("a", "base:allocation", "qemu:dirty-bitmap:x")), optBytes(OptGo, nameAndInfos(""))))
	f.Add(cat(clientFlags, optBytes(OptExportName, []byte("a"))))
	f.Add(cat(clientFlags, optBytes(99, []byte("junk")), optBytes(OptStartTLS, nil)))
	f.Add(cat(clientFlags, optBytes(OptListMetaContext, append(append(be32(1), 'a'), be32(0xffffffff)...))))
	f.Add(cat([]byte{0, 0, 0, 0}, optBytes(OptExportName, nil)))
	f.Fuzz(func(t *testing.T, input []byte) { fuzzServe(t, input) })
}

func FuzzTransmission(f *testing.F) {
	f.Add(byte(1), cat(reqBytes(CmdWrite, FlagFUA, 1, 0, 4, []byte("abcd")), reqBytes(CmdRead, FlagDF, 2, 0, 4096, nil)))
	f.Add(byte(1), cat(reqBytes(CmdBlockStatus, 0, 1, 0, 1<<20, nil), reqBytes(CmdBlockStatus, FlagReqOne, 2, 100, 100, nil)))
	f.Add(byte(0), cat(reqBytes(CmdTrim, 0, 1, 0, 4096, nil), reqBytes(CmdWriteZeroes, FlagNoHole|FlagFastZero, 2, 0, 1<<20, nil),
		reqBytes(CmdFlush, 0, 3, 0, 0, nil), reqBytes(CmdCache, 0, 4, 0, 10, nil)))
	f.Add(byte(2), cat(reqBytes(CmdWrite, 0, 1, 0, 512, make([]byte, 512)), reqBytes(CmdRead, 0, 2, 1<<20, 100, nil)))
	f.Add(byte(0), cat(reqBytes(CmdRead, 0, 1, 0, 0xffffffff, nil), reqBytes(CmdWrite, 0, 2, 0, 0xffffffff, nil)))
	f.Add(byte(1), cat(reqBytes(77, 0xffff, 1, 0, 1, nil), reqBytes(CmdDisc, 0, 2, 0, 0, nil)))
	f.Fuzz(func(t *testing.T, mode byte, input []byte) {
		// mode picks the negotiation: simple or structured replies, and
		// the writable or the read-only export.
		prefix := clientFlags
		if mode&1 != 0 {
			prefix = cat(prefix, optBytes(OptStructuredReply, nil),
				optBytes(OptSetMetaContext, metaPayload("a", "base:allocation", "qemu:dirty-bitmap:x")))
		}
		name := "a"
		if mode&2 != 0 {
			name = "ro"
		}
		fuzzServe(t, cat(prefix, optBytes(OptGo, nameAndInfos(name)), input))
	})
}
