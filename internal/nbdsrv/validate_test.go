package nbdsrv

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
)

func TestValidate(t *testing.T) {
	const size = 1 << 20
	rw := exportState{
		size:       size,
		flags:      FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero | FlagSendCache | FlagSendDF,
		structured: true, minBlock: 1, maxBlock: 64 << 10, metaContexts: 1,
	}
	ro := rw
	ro.flags = FlagHasFlags | FlagReadOnly
	simple := rw
	simple.structured, simple.flags = false, rw.flags&^FlagSendDF
	noMeta := rw
	noMeta.metaContexts = 0
	aligned := rw
	aligned.minBlock = 512
	unaligned := aligned
	unaligned.size = size + 100 // last block partial
	bare := rw
	bare.flags = FlagHasFlags // writable but no optional commands

	tests := []struct {
		name  string
		r     reqInfo
		st    exportState
		errno Errno
	}{
		{"read ok", reqInfo{cmd: CmdRead, off: 0, length: 4096}, rw, 0},
		{"read to the end", reqInfo{cmd: CmdRead, off: size - 1, length: 1}, rw, 0},
		{"read past the end", reqInfo{cmd: CmdRead, off: size - 1, length: 2}, rw, EINVAL},
		{"read offset past the end", reqInfo{cmd: CmdRead, off: size + 1, length: 1}, rw, EINVAL},
		{"read offset overflow", reqInfo{cmd: CmdRead, off: ^uint64(0), length: 1}, rw, EINVAL},
		{"read zero length", reqInfo{cmd: CmdRead, length: 0}, rw, EINVAL},
		{"read max", reqInfo{cmd: CmdRead, length: 64 << 10}, rw, 0},
		{"read max+1", reqInfo{cmd: CmdRead, length: 64<<10 + 1}, rw, EINVAL},
		{"read 4 GiB-1", reqInfo{cmd: CmdRead, length: 0xffffffff}, rw, EINVAL},
		{"read max+1 DF", reqInfo{cmd: CmdRead, flags: FlagDF, length: 64<<10 + 1}, rw, EOVERFLOW},
		{"read DF", reqInfo{cmd: CmdRead, flags: FlagDF, length: 512}, rw, 0},
		{"read DF without structured", reqInfo{cmd: CmdRead, flags: FlagDF, length: 512}, simple, EINVAL},
		{"read FUA accepted", reqInfo{cmd: CmdRead, flags: FlagFUA, length: 512}, rw, 0},
		{"read FUA not negotiated", reqInfo{cmd: CmdRead, flags: FlagFUA, length: 512}, ro, EINVAL},
		{"read on read-only", reqInfo{cmd: CmdRead, length: 512}, ro, 0},
		{"read unknown flag", reqInfo{cmd: CmdRead, flags: 1 << 9, length: 512}, rw, EINVAL},
		{"read PAYLOAD_LEN", reqInfo{cmd: CmdRead, flags: FlagPayloadLen, length: 512}, rw, EINVAL},
		{"read REQ_ONE", reqInfo{cmd: CmdRead, flags: FlagReqOne, length: 512}, rw, EINVAL},
		{"write ok", reqInfo{cmd: CmdWrite, off: 512, length: 512}, rw, 0},
		{"write FUA", reqInfo{cmd: CmdWrite, flags: FlagFUA, length: 512}, rw, 0},
		{"write read-only", reqInfo{cmd: CmdWrite, length: 512}, ro, EPERM},
		{"write past the end", reqInfo{cmd: CmdWrite, off: size, length: 1}, rw, ENOSPC},
		{"write max+1", reqInfo{cmd: CmdWrite, length: 64<<10 + 1}, rw, EINVAL},
		{"write NO_HOLE", reqInfo{cmd: CmdWrite, flags: FlagNoHole, length: 1}, rw, EINVAL},
		{"write DF", reqInfo{cmd: CmdWrite, flags: FlagDF, length: 1}, rw, EINVAL},
		{"write unaligned offset", reqInfo{cmd: CmdWrite, off: 100, length: 512}, aligned, EINVAL},
		{"write unaligned length", reqInfo{cmd: CmdWrite, off: 0, length: 100}, aligned, EINVAL},
		{"write aligned", reqInfo{cmd: CmdWrite, off: 512, length: 1024}, aligned, 0},
		{"write partial last block", reqInfo{cmd: CmdWrite, off: size, length: 100}, unaligned, 0},
		{"flush", reqInfo{cmd: CmdFlush}, rw, 0},
		{"flush FUA", reqInfo{cmd: CmdFlush, flags: FlagFUA}, rw, 0},
		{"flush with length", reqInfo{cmd: CmdFlush, length: 1}, rw, EINVAL},
		{"flush with offset", reqInfo{cmd: CmdFlush, off: 1}, rw, EINVAL},
		{"flush unsupported", reqInfo{cmd: CmdFlush}, ro, EINVAL},
		{"trim", reqInfo{cmd: CmdTrim, length: 4096}, rw, 0},
		{"trim past the end", reqInfo{cmd: CmdTrim, off: size, length: 1}, rw, EINVAL},
		{"trim over max block", reqInfo{cmd: CmdTrim, length: size}, rw, 0},
		{"trim read-only", reqInfo{cmd: CmdTrim, length: 1}, ro, EPERM},
		{"trim unsupported", reqInfo{cmd: CmdTrim, length: 1}, bare, EINVAL},
		{"zeroes", reqInfo{cmd: CmdWriteZeroes, length: size}, rw, 0},
		{"zeroes NO_HOLE FAST_ZERO FUA", reqInfo{cmd: CmdWriteZeroes, flags: FlagNoHole | FlagFastZero | FlagFUA, length: 1}, rw, 0},
		{"zeroes past the end", reqInfo{cmd: CmdWriteZeroes, off: 1, length: size}, rw, ENOSPC},
		{"zeroes read-only", reqInfo{cmd: CmdWriteZeroes, length: 1}, ro, EPERM},
		{"zeroes unsupported", reqInfo{cmd: CmdWriteZeroes, length: 1}, bare, EINVAL},
		{"zeroes zero length", reqInfo{cmd: CmdWriteZeroes, length: 0}, rw, EINVAL},
		{"fast zero on read", reqInfo{cmd: CmdRead, flags: FlagFastZero, length: 1}, rw, EINVAL},
		{"cache", reqInfo{cmd: CmdCache, length: 1}, rw, 0},
		{"cache unsupported", reqInfo{cmd: CmdCache, length: 1}, ro, EINVAL},
		{"block status", reqInfo{cmd: CmdBlockStatus, length: size}, rw, 0},
		{"block status REQ_ONE", reqInfo{cmd: CmdBlockStatus, flags: FlagReqOne, length: 0xffffffff}, unaligned, EINVAL},
		{"block status unaligned ok", reqInfo{cmd: CmdBlockStatus, flags: FlagReqOne, off: 1, length: 3}, aligned, 0},
		{"block status no context", reqInfo{cmd: CmdBlockStatus, length: 1}, noMeta, EINVAL},
		{"block status simple", reqInfo{cmd: CmdBlockStatus, length: 1}, simple, EINVAL},
		{"block status past the end", reqInfo{cmd: CmdBlockStatus, off: size, length: 1}, rw, EINVAL},
		{"block status zero length", reqInfo{cmd: CmdBlockStatus, length: 0}, rw, EINVAL},
		{"resize", reqInfo{cmd: CmdResize, length: 1}, rw, EINVAL},
		{"unknown command", reqInfo{cmd: 77, length: 1}, rw, EINVAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, reason := validate(tt.r, tt.st)
			if got != tt.errno {
				t.Errorf("validate(%+v) = %v (%s), want %v", tt.r, got, reason, tt.errno)
			}
			if (got == 0) != (reason == "") {
				t.Errorf("errno %v with reason %q", got, reason)
			}
		})
	}
}

func TestErrnoOf(t *testing.T) {
	tests := []struct {
		err  error
		want Errno
	}{
		{nil, 0},
		{syscall.EIO, EIO},
		{fmt.Errorf("wrapped: %w", syscall.ENOSPC), ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EPERM, EPERM},
		{syscall.EROFS, EPERM},
		{syscall.EINVAL, EINVAL},
		{syscall.ENOMEM, ENOMEM},
		{syscall.ENOTSUP, ENOTSUP},
		{syscall.EOPNOTSUPP, ENOTSUP},
		{syscall.ESHUTDOWN, ESHUTDOWN},
		{syscall.ENOENT, EIO},
		{ErrNotFast, ENOTSUP},
		{fmt.Errorf("x: %w", ErrNotFast), ENOTSUP},
		{context.Canceled, ESHUTDOWN},
		{errors.New("anything else"), EIO},
	}
	for _, tt := range tests {
		if got := errnoOf(tt.err); got != tt.want {
			t.Errorf("errnoOf(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{OptGo.String(), "NBD_OPT_GO"},
		{Opt(99).String(), "NBD_OPT_99"},
		{RepErrUnsup.String(), "NBD_REP_ERR_UNSUP"},
		{CmdWriteZeroes.String(), "NBD_CMD_WRITE_ZEROES"},
		{(FlagFUA | FlagReqOne).String(), "FUA|REQ_ONE"},
		{(FlagHasFlags | FlagReadOnly).String(), "HAS_FLAGS|READ_ONLY"},
		{ReplyErrorOffset.String(), "NBD_REPLY_TYPE_ERROR_OFFSET"},
		{EOVERFLOW.String(), "NBD_EOVERFLOW"},
		{InfoBlockSize.String(), "NBD_INFO_BLOCK_SIZE"},
		{CmdFlags(1 << 9).String(), "bit9"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}
