package nbdsrv

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

func threeExports() []Export {
	return []Export{
		{Name: "alpha", Description: "first", Size: 1 << 20, Backend: newMem(1 << 20)},
		{Name: "beta", Size: 2 << 20, Backend: readOnlyMem{newMem(2 << 20)}},
		{Name: "gamma", Description: "third", Size: 3 << 20, Backend: newMem(3 << 20), MinBlock: 512, PreferredBlock: 8192, MaxBlock: 1 << 20,
			MetaContexts: contextList(staticContext{name: "qemu:dirty-bitmap:snap1"}, staticContext{name: "x-test:thing"})},
	}
}

func TestHandshakeUnknownClientFlags(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(1 << 7)
	rc.expectClosed()
	waitLog(t, ts, "unknown client flags")
}

func TestOptExportName(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	for _, noZeroes := range []bool{false, true} {
		rc := dialRaw(t, ts.addr)
		f := ClientFlagFixedNewstyle
		if noZeroes {
			f |= ClientFlagNoZeroes
		}
		rc.handshake(f)
		rc.sendOpt(OptExportName, []byte("beta"))
		b := rc.read(10)
		if size := binary.BigEndian.Uint64(b); size != 2<<20 {
			t.Errorf("size %d", size)
		}
		if fl := TransFlags(binary.BigEndian.Uint16(b[8:])); fl != FlagHasFlags|FlagReadOnly {
			t.Errorf("flags %v", fl)
		}
		if !noZeroes && !bytes.Equal(rc.read(124), make([]byte, 124)) {
			t.Error("padding not zero")
		}
		// The connection is in transmission: a read works.
		rc.request(CmdRead, 0, 7, 0, 512, nil)
		if e, cookie, _ := rc.simple(512); e != 0 || cookie != 7 {
			t.Errorf("read: %v cookie %d", e, cookie)
		}
	}
	// Unknown name: EXPORT_NAME has no error reply, so the server closes.
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptExportName, []byte("nope"))
	rc.expectClosed()
}

func TestOptList(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	rc.sendOpt(OptList, nil)
	var names, descs []string
	for {
		r := rc.readOptReply()
		if r.rep == RepAck {
			break
		}
		if r.rep != RepServer {
			t.Fatalf("LIST: %v", r.rep)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
		descs = append(descs, string(r.data[4+n:]))
	}
	if !slices.Equal(names, []string{"alpha", "beta", "gamma"}) || !slices.Equal(descs, []string{"first", "", "third"}) {
		t.Errorf("LIST: %q %q", names, descs)
	}
	rc.sendOpt(OptList, []byte{1})
	rc.expectRep(OptList, RepErrInvalid)
}

func TestOptInfoGo(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)

	ei := rc.info(OptInfo, "gamma", InfoName, InfoDescription, InfoBlockSize, 77)
	if ei.size != 3<<20 || !ei.hasName || ei.name != "gamma" || ei.desc != "third" ||
		ei.minB != 512 || ei.prefB != 8192 || ei.maxB != 1<<20 {
		t.Errorf("INFO gamma: %+v", ei)
	}
	want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero | FlagSendCache
	if ei.flags != want {
		t.Errorf("flags %v, want %v", ei.flags, want)
	}
	// Block sizes are sent unasked, names only when asked.
	ei = rc.info(OptInfo, "alpha")
	if !ei.hasBlockSize || ei.minB != 1 || ei.prefB != 4096 || ei.maxB != 32<<20 || ei.hasName || ei.hasDesc {
		t.Errorf("INFO alpha: %+v", ei)
	}
	rc.sendOpt(OptInfo, nameAndInfos("nope"))
	rc.expectRep(OptInfo, RepErrUnknown)
	rc.sendOpt(OptGo, nameAndInfos("nope"))
	rc.expectRep(OptGo, RepErrUnknown)
	// Malformed: a name length beyond the payload, an odd info list,
	// a name over 4096 bytes.
	rc.sendOpt(OptInfo, append(be32(100), "abc"...))
	rc.expectRep(OptInfo, RepErrInvalid)
	rc.sendOpt(OptGo, append(nameAndInfos("alpha"), 0))
	rc.expectRep(OptGo, RepErrInvalid)
	rc.sendOpt(OptGo, nameAndInfos(string(make([]byte, 4097))))
	rc.expectRep(OptGo, RepErrInvalid)
	// INFO on one export then GO on another serves the GO's export.
	rc.info(OptInfo, "gamma")
	ei = rc.info(OptGo, "beta")
	if ei.size != 2<<20 || ei.flags&FlagReadOnly == 0 {
		t.Errorf("GO beta: %+v", ei)
	}
	rc.request(CmdWrite, 0, 1, 0, 1, []byte{1})
	if e, _, _ := rc.simple(0); e != EPERM {
		t.Errorf("write to beta: %v, want EPERM", e)
	}
	if n := ts.OpenConns("beta"); n != 1 {
		t.Errorf("OpenConns(beta) = %d", n)
	}
}

func TestDefaultExport(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptGo, nameAndInfos(""))
	rc.expectRep(OptGo, RepErrUnknown)
	ts.SetDefaultExport("gamma")
	ei := rc.info(OptGo, "", InfoName)
	if ei.size != 3<<20 || ei.name != "gamma" {
		t.Errorf("default export: %+v", ei)
	}
}

func TestOptAbort(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptAbort, nil)
	rc.expectRep(OptAbort, RepAck)
	rc.expectClosed()
}

func TestOptStructuredReply(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptStructuredReply, []byte{0})
	rc.expectRep(OptStructuredReply, RepErrInvalid)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)
	ei := rc.info(OptGo, "alpha")
	if ei.flags&FlagSendDF == 0 {
		t.Errorf("DF not advertised with structured replies: %v", ei.flags)
	}
}

func TestOptUnknownAndTooLong(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	for _, o := range []Opt{OptPeekExport, OptExtendedHeaders, 99, 0x7fffffff} {
		rc.sendOpt(o, bytes.Repeat([]byte{0xee}, 3000))
		rc.expectRep(o, RepErrUnsup)
	}
	// A payload over the in-memory cap is drained and refused.
	rc.sendOpt(OptInfo, make([]byte, maxOptionLen+1))
	rc.expectRep(OptInfo, RepErrTooBig)
	rc.sendOpt(OptSetMetaContext, make([]byte, maxOptionLen+1))
	rc.expectRep(OptSetMetaContext, RepErrTooBig)
	// Still in step: GO works.
	if ei := rc.info(OptGo, "alpha"); ei.size != 1<<20 {
		t.Errorf("GO after drained options: %+v", ei)
	}
	// Beyond the drain limit the connection ends.
	rc = dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	h := make([]byte, 16)
	binary.BigEndian.PutUint64(h, magicIHaveOpt)
	binary.BigEndian.PutUint32(h[8:], 99)
	binary.BigEndian.PutUint32(h[12:], maxOptionDrain+1)
	rc.write(h)
	rc.expectClosed()
}

func TestOptBadMagicAndCount(t *testing.T) {
	ts := startServer(t, Config{MaxOptions: 5}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.write(make([]byte, 16))
	rc.expectClosed()
	waitLog(t, ts, "bad option magic")

	rc = dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	for i := 0; i < 5; i++ {
		rc.sendOpt(OptList, nil)
		for rc.readOptReply().rep != RepAck {
		}
	}
	rc.sendOpt(OptList, nil)
	rc.expectClosed()
	waitLog(t, ts, "more than 5 options")
}

func TestMetaContextOptions(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	if _, rep := rc.listMeta("gamma"); rep != RepErrInvalid {
		t.Errorf("LIST without structured replies: %v", rep)
	}
	rc.sendOpt(OptSetMetaContext, metaPayload("gamma", "base:allocation"))
	rc.expectRep(OptSetMetaContext, RepErrInvalid)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)

	all := []string{"base:allocation", "qemu:dirty-bitmap:snap1", "x-test:thing"}
	for _, tt := range []struct {
		queries []string
		want    []string
	}{
		{nil, all},
		{[]string{"base:"}, all[:1]},
		{[]string{"qemu:"}, all[1:2]},
		{[]string{"qemu:dirty-bitmap:"}, all[1:2]},
		{[]string{"qemu:dirty-bitmap:snap1", "x-test:thing"}, all[1:]},
		{[]string{"unknown:ns", "nocolon"}, nil},
		{[]string{"base:allocation", "base:allocation"}, all[:1]},
	} {
		got, rep := rc.listMeta("gamma", tt.queries...)
		if rep != RepAck || !slices.Equal(got, tt.want) {
			t.Errorf("LIST %q = %q %v, want %q", tt.queries, got, rep, tt.want)
		}
	}
	if got, _ := rc.listMeta("alpha"); !slices.Equal(got, all[:1]) {
		t.Errorf("LIST alpha = %q", got)
	}
	if _, rep := rc.listMeta("nope"); rep != RepErrUnknown {
		t.Errorf("LIST unknown export: %v", rep)
	}
	// Malformed: query count beyond the payload, query length beyond it,
	// trailing bytes.
	for _, p := range [][]byte{
		append(metaPayload("gamma"), 0)[:len(metaPayload("gamma"))-4],
		append(append(be32(5), "gamma"...), append(be32(1), be32(50)...)...),
		append(metaPayload("gamma", "base:allocation"), 1, 2),
		append(append(be32(5), "gamma"...), be32(0xffffffff)...),
	} {
		rc.sendOpt(OptListMetaContext, p)
		rc.expectRep(OptListMetaContext, RepErrInvalid)
		rc.sendOpt(OptSetMetaContext, p)
		rc.expectRep(OptSetMetaContext, RepErrInvalid)
	}
	// SET selects exact names only, with distinct ids.
	ids := rc.setMeta("gamma", "base:allocation", "qemu:dirty-bitmap:", "x-test:thing", "qemu:dirty-bitmap:snap1")
	if len(ids) != 3 {
		t.Errorf("SET = %v, want three contexts", ids)
	}
	if ids := rc.setMeta("gamma"); len(ids) != 0 {
		t.Errorf("SET with no query = %v", ids)
	}
}

// SET selects by full name only: wildcards, empty leaves, unknown
// namespaces and queries without a colon select nothing and are no error.
func TestMetaContextSetQueries(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)
	for _, tt := range []struct {
		queries []string
		want    []string
	}{
		{[]string{"qemu:"}, nil},
		{[]string{"qemu:dirty-bitmap:"}, nil},
		{[]string{"base:"}, nil},
		{[]string{"x-foo:bar", "nocolon", ":", "", "qemu:dirty-bitmap:nope"}, nil},
		{[]string{"qemu:", "x-test:thing"}, []string{"x-test:thing"}},
		{[]string{"x-test:thing", "base:allocation", "x-test:thing"}, []string{"base:allocation", "x-test:thing"}},
	} {
		ids := rc.setMeta("gamma", tt.queries...)
		var got []string
		for id, n := range ids {
			if id == 0 {
				t.Errorf("SET %q: id 0 for %s", tt.queries, n)
			}
			got = append(got, n)
		}
		slices.Sort(got)
		if len(ids) != len(tt.want) || !slices.Equal(got, tt.want) {
			t.Errorf("SET %q = %v, want %q", tt.queries, ids, tt.want)
		}
	}
}

// Names the export's owner got wrong are left out of every answer, and
// logged; the valid ones are still offered.
func TestMetaContextInvalidNames(t *testing.T) {
	long := "x-long:" + strings.Repeat("a", maxStringLen)
	ts := startServer(t, Config{}, Export{Name: "a", Size: 1 << 20, Backend: newMem(1 << 20),
		MetaContexts: contextList(staticContext{name: "base:allocation"}, staticContext{name: "nocolon"},
			staticContext{name: ":leaf"}, staticContext{name: "ns:"}, staticContext{name: "x-ok:one"},
			staticContext{name: "x-ok:one"}, staticContext{name: long}, nil, staticContext{name: "x-ok:two"})})
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)
	want := []string{"base:allocation", "x-ok:one", "x-ok:two"}
	if got, rep := rc.listMeta("a"); rep != RepAck || !slices.Equal(got, want) {
		t.Errorf("LIST = %q %v, want %q", got, rep, want)
	}
	if ids := rc.setMeta("a", "base:allocation", "nocolon", "ns:", "x-ok:one"); len(ids) != 2 {
		t.Errorf("SET = %v, want base:allocation and x-ok:one", ids)
	}
	for _, why := range []string{"base:allocation is built in", "name not namespace:leaf", "duplicate name", "name over 4096 bytes", "reason=nil"} {
		waitLog(t, ts, why)
	}
}

// The export's list is read at every LIST and SET; a connection keeps what
// its SET selected, with the same ids, whatever happens to the list later,
// and a context dropped after the SET answers with an error, not with
// another context's extents.
func TestMetaContextListChanges(t *testing.T) {
	set := &contextSet{}
	set.add("qemu:dirty-bitmap:a", Extent{4096, ExtentDirty}, Extent{1<<20 - 4096, 0})
	ts := startServer(t, Config{}, Export{Name: "e", Size: 1 << 20, Backend: newMem(1 << 20), MetaContexts: set.contexts})
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)
	list := func(want ...string) {
		t.Helper()
		if got, rep := rc.listMeta("e", "qemu:"); rep != RepAck || !slices.Equal(got, want) {
			t.Errorf("LIST qemu: = %q %v, want %q", got, rep, want)
		}
	}
	list("qemu:dirty-bitmap:a")
	set.add("qemu:dirty-bitmap:b", Extent{8192, 0}, Extent{1<<20 - 8192, ExtentDirty})
	list("qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b")
	set.drop("qemu:dirty-bitmap:a")
	list("qemu:dirty-bitmap:b")
	set.add("qemu:dirty-bitmap:a", Extent{4096, ExtentDirty}, Extent{1<<20 - 4096, 0})
	list("qemu:dirty-bitmap:b", "qemu:dirty-bitmap:a")

	ids := rc.setMeta("e", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b")
	byName := map[string]uint32{}
	for id, n := range ids {
		byName[n] = id
	}
	if len(byName) != 2 {
		t.Fatalf("SET = %v", ids)
	}
	rc.info(OptGo, "e")
	// Later changes: a new context before b, b dropped and a new b.
	set.drop("qemu:dirty-bitmap:b")
	set.add("qemu:dirty-bitmap:c", Extent{1 << 20, ExtentDirty})
	set.add("qemu:dirty-bitmap:b", Extent{1 << 20, 0})

	// The request as a whole fails for the dropped b.
	rc.request(CmdBlockStatus, 0, 1, 0, 65536, nil)
	if e, _ := chunkErrno(t, rc.chunk()); e != EIO {
		t.Errorf("block status with a dropped context: %v, want EIO", e)
	}
	waitLog(t, ts, "meta context qemu:dirty-bitmap:b is gone")

	// A second connection selects the new b and c; then a, listed before
	// both, is dropped: their places in the list change, their ids and
	// extents on this connection do not.
	rc2 := dialRaw(t, ts.addr)
	_, ids2 := rc2.open("e", true, "qemu:dirty-bitmap:c", "qemu:dirty-bitmap:b")
	set.drop("qemu:dirty-bitmap:a")
	set.add("qemu:dirty-bitmap:d", Extent{1 << 20, ExtentDirty})
	rc2.request(CmdBlockStatus, 0, 2, 0, 65536, nil)
	got := map[string][2]uint32{}
	for i := 0; i < 2; i++ {
		c := rc2.chunk()
		if c.typ != ReplyBlockStatus {
			t.Fatalf("chunk %v", c.typ)
		}
		n, ok := ids2[binary.BigEndian.Uint32(c.payload)]
		if !ok {
			t.Fatalf("unknown id %d, selected %v", binary.BigEndian.Uint32(c.payload), ids2)
		}
		got[n] = [2]uint32{binary.BigEndian.Uint32(c.payload[4:]), binary.BigEndian.Uint32(c.payload[8:])}
	}
	if want := map[string][2]uint32{"qemu:dirty-bitmap:c": {65536, ExtentDirty}, "qemu:dirty-bitmap:b": {65536, 0}}; !maps.Equal(got, want) {
		t.Errorf("second connection: %v, want %v", got, want)
	}
}

// One SET may select at most maxSelectedContexts contexts.
func TestMetaContextTooMany(t *testing.T) {
	var mcs []MetaContext
	var names []string
	for i := range maxSelectedContexts {
		n := fmt.Sprintf("x-many:%d", i)
		mcs = append(mcs, staticContext{name: n})
		names = append(names, n)
	}
	ts := startServer(t, Config{}, Export{Name: "m", Size: 1 << 20, Backend: newMem(1 << 20), MetaContexts: contextList(mcs...)})
	rc := dialRaw(t, ts.addr)
	rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
	rc.sendOpt(OptStructuredReply, nil)
	rc.expectRep(OptStructuredReply, RepAck)
	if got, _ := rc.listMeta("m"); len(got) != maxSelectedContexts+1 {
		t.Errorf("LIST: %d contexts, want %d", len(got), maxSelectedContexts+1)
	}
	if ids := rc.setMeta("m", names...); len(ids) != maxSelectedContexts {
		t.Errorf("SET of %d: %d", maxSelectedContexts, len(ids))
	}
	rc.sendOpt(OptSetMetaContext, metaPayload("m", append(names, "base:allocation")...))
	rc.expectRep(OptSetMetaContext, RepErrTooBig)
	// The refused SET cleared the selection.
	rc.info(OptGo, "m")
	rc.request(CmdBlockStatus, 0, 1, 0, 4096, nil)
	if e, _ := chunkErrno(t, rc.chunk()); e != EINVAL {
		t.Errorf("block status after a refused SET: %v, want EINVAL", e)
	}
}

// A SET_META_CONTEXT applies only to the export it named, and each SET
// replaces the last, even when it fails.
func TestMetaContextSelection(t *testing.T) {
	ts := startServer(t, Config{}, threeExports()...)
	blockStatusErrno := func(rc *rawClient) Errno {
		rc.request(CmdBlockStatus, 0, 9, 0, 4096, nil)
		c := rc.chunk()
		if c.typ == ReplyBlockStatus {
			return 0
		}
		e, _ := chunkErrno(t, c)
		return e
	}
	setup := func(f func(rc *rawClient)) *rawClient {
		rc := dialRaw(t, ts.addr)
		rc.handshake(ClientFlagFixedNewstyle | ClientFlagNoZeroes)
		rc.sendOpt(OptStructuredReply, nil)
		rc.expectRep(OptStructuredReply, RepAck)
		f(rc)
		rc.info(OptGo, "alpha")
		return rc
	}
	if e := blockStatusErrno(setup(func(rc *rawClient) { rc.setMeta("alpha", "base:allocation") })); e != 0 {
		t.Errorf("selected: %v", e)
	}
	if e := blockStatusErrno(setup(func(rc *rawClient) { rc.setMeta("gamma", "base:allocation") })); e != EINVAL {
		t.Errorf("selected on another export: %v, want EINVAL", e)
	}
	if e := blockStatusErrno(setup(func(rc *rawClient) {
		rc.setMeta("alpha", "base:allocation")
		rc.sendOpt(OptSetMetaContext, metaPayload("nope", "base:allocation"))
		rc.expectRep(OptSetMetaContext, RepErrUnknown)
	})); e != EINVAL {
		t.Errorf("after a failed SET: %v, want EINVAL", e)
	}
	if e := blockStatusErrno(setup(func(rc *rawClient) {})); e != EINVAL {
		t.Errorf("never selected: %v, want EINVAL", e)
	}
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, Config{HandshakeTimeout: 200 * time.Millisecond}, threeExports()...)
	rc := dialRaw(t, ts.addr)
	start := time.Now()
	rc.read(18)
	rc.write(be32(uint32(ClientFlagFixedNewstyle)))
	rc.write([]byte("IHAVE")) // and stall mid-option
	rc.expectClosed()
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("closed after %v", d)
	}
	waitLog(t, ts, "handshake timed out")
	// After entering transmission there is no deadline.
	rc = dialRaw(t, ts.addr)
	rc.open("alpha", false)
	time.Sleep(400 * time.Millisecond)
	rc.request(CmdRead, 0, 1, 0, 1, nil)
	if e, _, _ := rc.simple(1); e != 0 {
		t.Errorf("read after idle: %v", e)
	}
}

// waitLog waits until the server's log contains s.
func waitLog(t testing.TB, ts *testServer, s string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if contains(ts.logs.String(), s) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("log lacks %q:\n%s", s, ts.logs.String())
}
