package nbdsrv

// reqInfo is what the validation gate looks at in a request header.
type reqInfo struct {
	cmd    Cmd
	flags  CmdFlags
	off    uint64
	length uint32
}

// exportState is what the gate knows of the connection's export and
// negotiation.
type exportState struct {
	size         uint64
	flags        TransFlags // as advertised to this client
	structured   bool
	minBlock     uint32
	maxBlock     uint32
	metaContexts int // contexts selected by SET_META_CONTEXT for this export
}

// validate is the one gate every request passes before dispatch. It is a
// pure function: a zero Errno admits the request, anything else is the
// error to reply with and the reason to log. The order of the checks
// decides which error wins when several apply: a command the export does
// not have, then read-only, then flags, then lengths and ranges.
func validate(r reqInfo, st exportState) (Errno, string) {
	write := false
	switch r.cmd {
	case CmdRead:
	case CmdWrite, CmdWriteZeroes, CmdTrim:
		write = true
	case CmdFlush:
		if st.flags&FlagSendFlush == 0 {
			return EINVAL, "flush not supported by this export"
		}
	case CmdCache:
		if st.flags&FlagSendCache == 0 {
			return EINVAL, "cache not supported by this export"
		}
	case CmdBlockStatus:
		if !st.structured {
			return EINVAL, "block status without structured replies"
		}
		if st.metaContexts == 0 {
			return EINVAL, "block status without a selected meta context"
		}
	default:
		return EINVAL, "unknown command"
	}
	if write {
		if st.flags&FlagReadOnly != 0 {
			return EPERM, "export is read-only"
		}
		if r.cmd == CmdTrim && st.flags&FlagSendTrim == 0 {
			return EINVAL, "trim not supported by this export"
		}
		if r.cmd == CmdWriteZeroes && st.flags&FlagSendWriteZeroes == 0 {
			return EINVAL, "write zeroes not supported by this export"
		}
	}

	// Flags: each only on the commands it is defined for, and only if
	// advertised. FUA is valid on every command once SEND_FUA is (the spec:
	// the server must accept it, even by ignoring it).
	const known = FlagFUA | FlagNoHole | FlagDF | FlagReqOne | FlagFastZero
	switch {
	case r.flags&^known != 0:
		return EINVAL, "unknown command flags"
	case r.flags&FlagFUA != 0 && st.flags&FlagSendFUA == 0:
		return EINVAL, "FUA not negotiated"
	case r.flags&FlagNoHole != 0 && r.cmd != CmdWriteZeroes:
		return EINVAL, "NO_HOLE on a command other than write zeroes"
	case r.flags&FlagFastZero != 0 && (r.cmd != CmdWriteZeroes || st.flags&FlagSendFastZero == 0):
		return EINVAL, "FAST_ZERO not valid here"
	case r.flags&FlagDF != 0 && (r.cmd != CmdRead || st.flags&FlagSendDF == 0):
		return EINVAL, "DF not valid here"
	case r.flags&FlagReqOne != 0 && r.cmd != CmdBlockStatus:
		return EINVAL, "REQ_ONE on a command other than block status"
	}

	if r.cmd == CmdFlush {
		if r.off != 0 || r.length != 0 {
			return EINVAL, "flush with an offset or length"
		}
		return 0, ""
	}
	if r.length == 0 {
		return EINVAL, "zero length"
	}
	// Only READ and WRITE move a client-sized payload; the others may ask
	// for more than the maximum block (the spec allows it).
	if (r.cmd == CmdRead || r.cmd == CmdWrite) && r.length > st.maxBlock {
		if r.flags&FlagDF != 0 {
			return EOVERFLOW, "read larger than the maximum block"
		}
		return EINVAL, "length over the maximum block"
	}
	if r.off > st.size || uint64(r.length) > st.size-r.off {
		if r.cmd == CmdWrite || r.cmd == CmdWriteZeroes {
			return ENOSPC, "write beyond the end of the export"
		}
		return EINVAL, "range beyond the end of the export"
	}
	if r.cmd != CmdBlockStatus && st.minBlock > 1 {
		end := r.off + uint64(r.length)
		if r.off%uint64(st.minBlock) != 0 || (uint64(r.length)%uint64(st.minBlock) != 0 && end != st.size) {
			return EINVAL, "request not aligned to the minimum block size"
		}
	}
	return 0, ""
}
