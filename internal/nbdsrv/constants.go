package nbdsrv

import "fmt"

// Wire constants of the NBD protocol, as the NBD project's doc/proto.md
// defines them:
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
// Every number the server puts on or takes off the wire is named here and
// nowhere else.

// Magic numbers.
const (
	magicNBD             uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt        uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply        uint64 = 0x0003e889045565a9
	magicRequest         uint32 = 0x25609513
	magicSimpleReply     uint32 = 0x67446698
	magicStructReply     uint32 = 0x668e33ef
	magicExtRequest      uint32 = 0x21e41c71 // extended headers; never negotiated, recognised only to name it in logs
	maxStringLen                = 4096       // the spec's limit on every string
	requestHeaderLen            = 28
	simpleReplyLen              = 16
	structReplyLen              = 20
	optHeaderLen                = 16
	optReplyHeaderLen           = 20
	exportNameZeroPadLen        = 124
	baseAllocation              = "base:allocation"
)

// HandshakeFlags are sent by the server in the first 16-bit flags field.
type HandshakeFlags uint16

const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0
	FlagNoZeroes      HandshakeFlags = 1 << 1
)

// ClientFlags are the client's 32-bit answer to the handshake flags.
type ClientFlags uint32

const (
	ClientFlagFixedNewstyle ClientFlags = 1 << 0
	ClientFlagNoZeroes      ClientFlags = 1 << 1
	clientFlagsKnown                    = ClientFlagFixedNewstyle | ClientFlagNoZeroes
)

// TransFlags are the per-export transmission flags.
type TransFlags uint16

const (
	FlagHasFlags        TransFlags = 1 << 0
	FlagReadOnly        TransFlags = 1 << 1
	FlagSendFlush       TransFlags = 1 << 2
	FlagSendFUA         TransFlags = 1 << 3
	FlagRotational      TransFlags = 1 << 4
	FlagSendTrim        TransFlags = 1 << 5
	FlagSendWriteZeroes TransFlags = 1 << 6
	FlagSendDF          TransFlags = 1 << 7
	FlagCanMultiConn    TransFlags = 1 << 8
	FlagSendResize      TransFlags = 1 << 9
	FlagSendCache       TransFlags = 1 << 10
	FlagSendFastZero    TransFlags = 1 << 11
)

var transFlagNames = []string{"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL",
	"SEND_TRIM", "SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE", "SEND_FAST_ZERO"}

func (f TransFlags) String() string { return bitNames(uint64(f), transFlagNames) }

// Opt is an option code of the negotiation phase.
type Opt uint32

const (
	OptExportName      Opt = 1
	OptAbort           Opt = 2
	OptList            Opt = 3
	OptPeekExport      Opt = 4
	OptStartTLS        Opt = 5
	OptInfo            Opt = 6
	OptGo              Opt = 7
	OptStructuredReply Opt = 8
	OptListMetaContext Opt = 9
	OptSetMetaContext  Opt = 10
	OptExtendedHeaders Opt = 11
)

func (o Opt) String() string {
	switch o {
	case OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case OptAbort:
		return "NBD_OPT_ABORT"
	case OptList:
		return "NBD_OPT_LIST"
	case OptPeekExport:
		return "NBD_OPT_PEEK_EXPORT"
	case OptStartTLS:
		return "NBD_OPT_STARTTLS"
	case OptInfo:
		return "NBD_OPT_INFO"
	case OptGo:
		return "NBD_OPT_GO"
	case OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case OptListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case OptExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	}
	return fmt.Sprintf("NBD_OPT_%d", uint32(o))
}

// Rep is an option reply type.
type Rep uint32

const (
	RepAck              Rep = 1
	RepServer           Rep = 2
	RepInfo             Rep = 3
	RepMetaContext      Rep = 4
	repErrBit           Rep = 1 << 31
	RepErrUnsup         Rep = repErrBit + 1
	RepErrPolicy        Rep = repErrBit + 2
	RepErrInvalid       Rep = repErrBit + 3
	RepErrPlatform      Rep = repErrBit + 4
	RepErrTLSReqd       Rep = repErrBit + 5
	RepErrUnknown       Rep = repErrBit + 6
	RepErrShutdown      Rep = repErrBit + 7
	RepErrBlockSizeReqd Rep = repErrBit + 8
	RepErrTooBig        Rep = repErrBit + 9
)

func (r Rep) String() string {
	switch r {
	case RepAck:
		return "NBD_REP_ACK"
	case RepServer:
		return "NBD_REP_SERVER"
	case RepInfo:
		return "NBD_REP_INFO"
	case RepMetaContext:
		return "NBD_REP_META_CONTEXT"
	case RepErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case RepErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case RepErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case RepErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case RepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case RepErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case RepErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	}
	return fmt.Sprintf("NBD_REP_%#x", uint32(r))
}

// InfoType is the type of an NBD_REP_INFO reply.
type InfoType uint16

const (
	InfoExport      InfoType = 0
	InfoName        InfoType = 1
	InfoDescription InfoType = 2
	InfoBlockSize   InfoType = 3
)

func (i InfoType) String() string {
	switch i {
	case InfoExport:
		return "NBD_INFO_EXPORT"
	case InfoName:
		return "NBD_INFO_NAME"
	case InfoDescription:
		return "NBD_INFO_DESCRIPTION"
	case InfoBlockSize:
		return "NBD_INFO_BLOCK_SIZE"
	}
	return fmt.Sprintf("NBD_INFO_%d", uint16(i))
}

// Cmd is a transmission-phase command.
type Cmd uint16

const (
	CmdRead        Cmd = 0
	CmdWrite       Cmd = 1
	CmdDisc        Cmd = 2
	CmdFlush       Cmd = 3
	CmdTrim        Cmd = 4
	CmdCache       Cmd = 5
	CmdWriteZeroes Cmd = 6
	CmdBlockStatus Cmd = 7
	CmdResize      Cmd = 8
)

func (c Cmd) String() string {
	switch c {
	case CmdRead:
		return "NBD_CMD_READ"
	case CmdWrite:
		return "NBD_CMD_WRITE"
	case CmdDisc:
		return "NBD_CMD_DISC"
	case CmdFlush:
		return "NBD_CMD_FLUSH"
	case CmdTrim:
		return "NBD_CMD_TRIM"
	case CmdCache:
		return "NBD_CMD_CACHE"
	case CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case CmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	case CmdResize:
		return "NBD_CMD_RESIZE"
	}
	return fmt.Sprintf("NBD_CMD_%d", uint16(c))
}

// CmdFlags are the per-request command flags.
type CmdFlags uint16

const (
	FlagFUA        CmdFlags = 1 << 0
	FlagNoHole     CmdFlags = 1 << 1
	FlagDF         CmdFlags = 1 << 2
	FlagReqOne     CmdFlags = 1 << 3
	FlagFastZero   CmdFlags = 1 << 4
	FlagPayloadLen CmdFlags = 1 << 5
)

var cmdFlagNames = []string{"FUA", "NO_HOLE", "DF", "REQ_ONE", "FAST_ZERO", "PAYLOAD_LEN"}

func (f CmdFlags) String() string { return bitNames(uint64(f), cmdFlagNames) }

// ReplyType is the type of a structured reply chunk.
type ReplyType uint16

const (
	ReplyNone        ReplyType = 0
	ReplyOffsetData  ReplyType = 1
	ReplyOffsetHole  ReplyType = 2
	ReplyBlockStatus ReplyType = 5
	ReplyError       ReplyType = 1<<15 + 1
	ReplyErrorOffset ReplyType = 1<<15 + 2
)

// replyFlagDone marks the last chunk of a structured reply.
const replyFlagDone uint16 = 1

func (r ReplyType) String() string {
	switch r {
	case ReplyNone:
		return "NBD_REPLY_TYPE_NONE"
	case ReplyOffsetData:
		return "NBD_REPLY_TYPE_OFFSET_DATA"
	case ReplyOffsetHole:
		return "NBD_REPLY_TYPE_OFFSET_HOLE"
	case ReplyBlockStatus:
		return "NBD_REPLY_TYPE_BLOCK_STATUS"
	case ReplyError:
		return "NBD_REPLY_TYPE_ERROR"
	case ReplyErrorOffset:
		return "NBD_REPLY_TYPE_ERROR_OFFSET"
	}
	return fmt.Sprintf("NBD_REPLY_TYPE_%d", uint16(r))
}

// Errno is an NBD error value. Zero means success.
type Errno uint32

const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) String() string {
	switch e {
	case 0:
		return "OK"
	case EPERM:
		return "NBD_EPERM"
	case EIO:
		return "NBD_EIO"
	case ENOMEM:
		return "NBD_ENOMEM"
	case EINVAL:
		return "NBD_EINVAL"
	case ENOSPC:
		return "NBD_ENOSPC"
	case EOVERFLOW:
		return "NBD_EOVERFLOW"
	case ENOTSUP:
		return "NBD_ENOTSUP"
	case ESHUTDOWN:
		return "NBD_ESHUTDOWN"
	}
	return fmt.Sprintf("NBD_ERRNO_%d", uint32(e))
}

// Flags of the base:allocation metadata context, for Extent.Flags.
const (
	ExtentHole uint32 = 1 << 0 // the range is not allocated
	ExtentZero uint32 = 1 << 1 // the range reads as zeros
)

// ExtentDirty is the flag of a qemu:dirty-bitmap:NAME context: the range is
// dirty (changed).
const ExtentDirty uint32 = 1 << 0

func bitNames(v uint64, names []string) string {
	if v == 0 {
		return "0"
	}
	s := ""
	for i := 0; v != 0; i++ {
		if v&1 != 0 {
			if s != "" {
				s += "|"
			}
			if i < len(names) {
				s += names[i]
			} else {
				s += fmt.Sprintf("bit%d", i)
			}
		}
		v >>= 1
	}
	return s
}
