package vfstest

import "fmt"

// OpKind names a file-system operation, for crash points and fault rules.
type OpKind uint8

// The operations MemFS counts and FaultFS can fail. OpAny matches every kind
// in a [Rule].
const (
	OpAny OpKind = iota
	OpRead
	OpWrite
	OpSync
	OpTruncate
	OpDeallocate
	OpZeroRange
	OpOpen
	OpRemove
	OpSize
)

var opNames = [...]string{"any", "read", "write", "sync", "truncate", "deallocate", "zero-range", "open", "remove", "size"}

func (k OpKind) String() string {
	if int(k) < len(opNames) {
		return opNames[k]
	}
	return fmt.Sprintf("OpKind(%d)", uint8(k))
}

// Op describes one operation as seen by a hook or a fault predicate.
type Op struct {
	Kind OpKind
	Name string // file name as opened
	Off  int64  // WriteAt/ReadAt offset, Truncate size, range start
	Len  int64  // bytes written/read, range length
	// Seq is the 1-based ordinal of this operation among the operations
	// counted by whoever reports it: MemFS counts mutating operations,
	// FaultFS counts operations of the same kind.
	Seq int64
}

func (o Op) String() string {
	return fmt.Sprintf("#%d %s %s off=%d len=%d", o.Seq, o.Kind, o.Name, o.Off, o.Len)
}
