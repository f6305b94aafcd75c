package nbdsrv

import (
	"encoding/binary"
	"io"
)

// Bounds of option haggling. Every length a client sends is checked against
// these before anything is allocated for it.
const (
	// maxOptionLen is the largest option payload read into memory: enough
	// for an export name and many meta context queries of 4096 bytes each.
	maxOptionLen = 64 << 10
	// maxOptionDrain is the largest option payload skipped (read and thrown
	// away through a small buffer) to answer an error; anything larger ends
	// the connection, since nothing legitimate is that large.
	maxOptionDrain = 1 << 20
)

// errOptAbort ends negotiation at the client's request.
var errOptAbort = errQuiet

// negotiate runs the handshake and option haggling until the client enters
// transmission on an export (c.exp set and attached), or returns why not.
// No backend method is called here except through the chosen export's
// later requests.
func (c *conn) negotiate() error {
	if err := c.handshake(); err != nil {
		return err
	}
	for n := 0; ; n++ {
		var h [optHeaderLen]byte
		if _, err := io.ReadFull(c.br, h[:8]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != magicIHaveOpt {
			return protoErrorf("bad option magic %#x", m)
		}
		if _, err := io.ReadFull(c.br, h[8:]); err != nil {
			return err
		}
		opt := Opt(binary.BigEndian.Uint32(h[8:]))
		length := binary.BigEndian.Uint32(h[12:])
		if n >= c.s.cfg.MaxOptions {
			return protoErrorf("more than %d options", c.s.cfg.MaxOptions)
		}
		done, err := c.option(opt, length)
		if err != nil || done {
			return err
		}
	}
}

// option handles one option whose header has been read; done reports that
// transmission begins.
func (c *conn) option(opt Opt, length uint32) (done bool, err error) {
	if c.tlsRequired(opt) {
		// FORCEDTLS (tls.go): nothing but STARTTLS and ABORT before TLS.
		if opt == OptExportName {
			return false, protoErrorf("%v before TLS on a listener that requires it", opt)
		}
		if length > maxOptionDrain {
			return false, protoErrorf("%v: length %d over %d", opt, length, maxOptionDrain)
		}
		if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
			return false, err
		}
		return false, c.optReply(opt, RepErrTLSReqd, []byte("TLS required: send NBD_OPT_STARTTLS first"))
	}
	if opt == OptExportName {
		// EXPORT_NAME has no error reply: all the server can do with a bad
		// one is close the connection.
		if length > maxStringLen {
			return false, protoErrorf("%v: name length %d over %d", opt, length, maxStringLen)
		}
		name := make([]byte, length)
		if _, err := io.ReadFull(c.br, name); err != nil {
			return false, err
		}
		return true, c.optExportName(string(name))
	}
	known := false
	switch opt {
	case OptAbort, OptList, OptStartTLS, OptInfo, OptGo, OptStructuredReply, OptListMetaContext, OptSetMetaContext:
		known = true
	}
	if !known || length > maxOptionLen {
		if length > maxOptionDrain {
			return false, protoErrorf("%v: length %d over %d", opt, length, maxOptionDrain)
		}
		if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
			return false, err
		}
		if opt == OptSetMetaContext {
			c.meta, c.metaExp = nil, nil // a SET replaces the selection even when it fails
		}
		if !known {
			c.log.Debug("nbd: unsupported option", "option", opt, "length", length)
			return false, c.optReply(opt, RepErrUnsup, []byte("option not supported"))
		}
		c.log.Warn("nbd: option too long", "option", opt, "length", length)
		return false, c.optReply(opt, RepErrTooBig, []byte("option too long"))
	}
	data := make([]byte, length)
	if _, err := io.ReadFull(c.br, data); err != nil {
		return false, err
	}
	switch opt {
	case OptAbort:
		// The client may close without reading the ACK; a failed write is
		// not worth reporting.
		c.optReply(opt, RepAck, nil)
		return false, errOptAbort
	case OptList:
		return false, c.optList(data)
	case OptStartTLS:
		return false, c.optStartTLS(data)
	case OptStructuredReply:
		if len(data) != 0 {
			return false, c.optReply(opt, RepErrInvalid, []byte("payload not empty"))
		}
		c.structured = true
		return false, c.optReply(opt, RepAck, nil)
	case OptInfo, OptGo:
		return c.optInfoGo(opt, data)
	default: // OptListMetaContext, OptSetMetaContext
		return false, c.optMetaContext(opt, data)
	}
}

// optReply sends one option reply: magic, option, type, length, data.
func (c *conn) optReply(opt Opt, rep Rep, data []byte) error {
	b := make([]byte, optReplyHeaderLen+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], uint32(opt))
	binary.BigEndian.PutUint32(b[12:], uint32(rep))
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	copy(b[optReplyHeaderLen:], data)
	_, err := c.nc.Write(b)
	return err
}

// optExportName enters transmission the old way: size, flags, and 124 bytes
// of zeros unless the client set NO_ZEROES.
func (c *conn) optExportName(name string) error {
	ex, ok := c.s.lookup(name)
	if !ok {
		return protoErrorf("%v: no export %q", OptExportName, name)
	}
	if !c.allowed(ex) {
		// No error reply exists for this option; GO would get one.
		return protoErrorf("%v: client not allowed on export %q", OptExportName, ex.Name)
	}
	if !c.s.attach(c, ex) {
		return protoErrorf("%v: export %q is going away", OptExportName, name)
	}
	c.enter(ex)
	n := 10
	if !c.noZeroes {
		n += exportNameZeroPadLen
	}
	b := make([]byte, n)
	binary.BigEndian.PutUint64(b[0:], uint64(ex.Size))
	binary.BigEndian.PutUint16(b[8:], uint16(c.flags))
	_, err := c.nc.Write(b)
	return err
}

// optList answers NBD_OPT_LIST: one NBD_REP_SERVER per export the client
// may use (name, then the description as the free-form rest), then ACK.
func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.optReply(OptList, RepErrInvalid, []byte("payload not empty"))
	}
	for _, ex := range c.s.exportList() {
		if !c.allowed(ex) {
			continue
		}
		b := make([]byte, 4+len(ex.Name)+len(ex.Description))
		binary.BigEndian.PutUint32(b, uint32(len(ex.Name)))
		copy(b[4:], ex.Name)
		copy(b[4+len(ex.Name):], ex.Description)
		if err := c.optReply(OptList, RepServer, b); err != nil {
			return err
		}
	}
	return c.optReply(OptList, RepAck, nil)
}

// optInfoGo answers NBD_OPT_INFO and NBD_OPT_GO.
//
//	C: u32 name length, name, u16 number of info requests, u16 each
func (c *conn) optInfoGo(opt Opt, data []byte) (bool, error) {
	p := parser{b: data}
	name, ok1 := p.str()
	nreq, ok2 := p.u16()
	if !ok1 || !ok2 || len(p.b) != 2*int(nreq) {
		return false, c.optReply(opt, RepErrInvalid, []byte("malformed request"))
	}
	var wantName, wantDesc bool
	for i := 0; i < int(nreq); i++ {
		t, _ := p.u16()
		switch InfoType(t) {
		case InfoName:
			wantName = true
		case InfoDescription:
			wantDesc = true
		}
	}
	ex, ok := c.s.lookup(name)
	if !ok {
		return false, c.optReply(opt, RepErrUnknown, []byte("no such export"))
	}
	if !c.allowed(ex) {
		return false, c.refuse(opt, ex)
	}
	if opt == OptGo {
		if !c.s.attach(c, ex) {
			return false, c.optReply(opt, RepErrShutdown, []byte("export is going away"))
		}
		c.enter(ex)
	}
	flags := c.transFlags(ex)
	var b [12]byte
	binary.BigEndian.PutUint16(b[0:], uint16(InfoExport))
	binary.BigEndian.PutUint64(b[2:], uint64(ex.Size))
	binary.BigEndian.PutUint16(b[10:], uint16(flags))
	if err := c.optReply(opt, RepInfo, b[:12]); err != nil {
		return false, err
	}
	if wantName {
		if err := c.optReply(opt, RepInfo, append([]byte{0, byte(InfoName)}, ex.Name...)); err != nil {
			return false, err
		}
	}
	if wantDesc && ex.Description != "" {
		if err := c.optReply(opt, RepInfo, append([]byte{0, byte(InfoDescription)}, ex.Description...)); err != nil {
			return false, err
		}
	}
	// Block sizes are always sent (nbdkit does too): the server enforces
	// them whether or not the client asked.
	var bs [14]byte
	binary.BigEndian.PutUint16(bs[0:], uint16(InfoBlockSize))
	binary.BigEndian.PutUint32(bs[2:], ex.MinBlock)
	binary.BigEndian.PutUint32(bs[6:], ex.PreferredBlock)
	binary.BigEndian.PutUint32(bs[10:], ex.MaxBlock)
	if err := c.optReply(opt, RepInfo, bs[:]); err != nil {
		return false, err
	}
	return opt == OptGo, c.optReply(opt, RepAck, nil)
}

// enter fixes the connection's transmission state for ex. Meta contexts
// selected for another export do not carry over.
func (c *conn) enter(ex *export) {
	if c.metaExp != ex {
		c.meta = nil
	}
	c.flags = c.transFlags(ex)
	c.state = exportState{
		size:         uint64(ex.Size),
		flags:        c.flags,
		structured:   c.structured,
		minBlock:     ex.MinBlock,
		maxBlock:     ex.MaxBlock,
		metaContexts: len(c.meta),
	}
}

// transFlags derives an export's transmission flags from its backend's
// capabilities and what this connection negotiated.
func (c *conn) transFlags(ex *export) TransFlags {
	f := FlagHasFlags
	_, w := ex.Backend.(Writer)
	writable := w && !ex.ReadOnly
	if !writable {
		f |= FlagReadOnly
	}
	if _, ok := ex.Backend.(Flusher); ok {
		f |= FlagSendFlush
	}
	if writable {
		// FUA goes to the backend with each write; WRITE_ZEROES is emulated
		// by writing zeros when the backend has no Zeroer, and then a fast
		// zero is answered NBD_ENOTSUP at once, which the spec allows.
		f |= FlagSendFUA | FlagSendWriteZeroes | FlagSendFastZero
		if _, ok := ex.Backend.(Trimmer); ok {
			f |= FlagSendTrim
		}
	}
	if _, ok := ex.Backend.(Cacher); ok {
		f |= FlagSendCache
	}
	if c.structured {
		f |= FlagSendDF
	}
	if ex.MultiConn {
		f |= FlagCanMultiConn
	}
	return f
}

// parser reads big-endian fields from an option payload, reporting whether
// each fit; it never allocates more than the payload already holds.
type parser struct{ b []byte }

func (p *parser) u16() (uint16, bool) {
	if len(p.b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(p.b)
	p.b = p.b[2:]
	return v, true
}

func (p *parser) u32() (uint32, bool) {
	if len(p.b) < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(p.b)
	p.b = p.b[4:]
	return v, true
}

// str reads a u32 length and that many bytes, at most maxStringLen.
func (p *parser) str() (string, bool) {
	n, ok := p.u32()
	if !ok || n > maxStringLen || uint64(n) > uint64(len(p.b)) {
		return "", false
	}
	s := string(p.b[:n])
	p.b = p.b[n:]
	return s, true
}
