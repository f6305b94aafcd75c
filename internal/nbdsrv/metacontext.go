package nbdsrv

import (
	"encoding/binary"
	"log/slog"
	"strings"
)

// Metadata contexts (the spec's "Metadata querying"): base:allocation,
// built in, and whatever Export.MetaContexts returns at the moment a client
// asks. The list may change while the export is served (the daemon adds a
// qemu:dirty-bitmap:NAME context when a snapshot is created and drops it
// when the snapshot is cleared), so it is read afresh at every LIST and
// SET, and a SET keeps the contexts it selected, not their places in the
// list: a later change of the list changes neither what a connection's ids
// mean nor which contexts its BLOCK_STATUS replies describe. A context
// dropped after a client selected it answers that client with its own
// Extents, which should fail (the client gets an error reply).
//
// Queries, the same for every namespace:
//
//   - LIST with no query lists every context of the export.
//   - A query ending in ':' ("base:", "qemu:", "qemu:dirty-bitmap:") is a
//     wildcard: LIST lists every context whose name starts with it; SET
//     selects nothing with it, as the spec recommends.
//   - Any other query names one context in full; LIST lists it and SET
//     selects it if the export has it.
//   - A query that matches nothing is ignored, not an error: an unknown
//     namespace or leaf, an empty leaf, and also a query without a colon,
//     which the spec lets a server refuse with NBD_REP_ERR_INVALID; ignoring
//     it is what qemu-nbd does and keeps a client's other queries working.

// selectedContext is a context a SET_META_CONTEXT selected, the id the
// client was given for it and its name as it was then.
type selectedContext struct {
	id   uint32
	name string
	mc   MetaContext
}

// maxSelectedContexts bounds the contexts one SET may select: each adds a
// chunk of up to maxBlockStatusDescs descriptors to every BLOCK_STATUS
// reply (and to the budget the request holds). More is refused with
// NBD_REP_ERR_TOO_BIG, as the spec allows.
const maxSelectedContexts = 64

// metaContexts returns the contexts ex offers now, with their names (id
// unset): base:allocation, then those of Export.MetaContexts whose names
// are valid. An invalid one is a bug of the export's owner, not of the
// client: it is logged (rate-limited, as a client can make the server ask
// once per option) and left out, so that no client is told a name it
// could not use.
func (c *conn) metaContexts(ex *export) []selectedContext {
	l := []selectedContext{{name: baseAllocation, mc: ex.base}}
	if ex.MetaContexts == nil {
		return l
	}
	seen := map[string]bool{}
	for _, mc := range ex.MetaContexts() {
		if mc == nil {
			c.s.loglim.logf(c.ctx, c.log, slog.LevelWarn, ex.Name+": nil meta context",
				"nbd: meta context skipped", "export", ex.Name, "reason", "nil")
			continue
		}
		n := mc.Name()
		if why := contextNameProblem(n, seen); why != "" {
			c.s.loglim.logf(c.ctx, c.log, slog.LevelWarn, ex.Name+": meta context "+why,
				"nbd: meta context skipped", "export", ex.Name, "context", truncName(n), "reason", why)
			continue
		}
		seen[n] = true
		l = append(l, selectedContext{name: n, mc: mc})
	}
	return l
}

// contextNameProblem says what is wrong with a context name offered besides
// base:allocation ("" if nothing): the spec's "namespace:leaf" with both
// parts non-empty, within the string limit, and unique on the export.
func contextNameProblem(n string, seen map[string]bool) string {
	ns, leaf, ok := strings.Cut(n, ":")
	switch {
	case len(n) > maxStringLen:
		return "name over 4096 bytes"
	case !ok || ns == "" || leaf == "":
		return "name not namespace:leaf"
	case n == baseAllocation:
		return "base:allocation is built in"
	case seen[n]:
		return "duplicate name"
	}
	return ""
}

// truncName shortens a name for a log line.
func truncName(n string) string {
	if len(n) > 100 {
		return n[:100] + "..."
	}
	return n
}

// metaQuery is the queries of one LIST or SET, deduplicated.
type metaQuery struct {
	all      bool            // LIST without a query
	names    map[string]bool // queries naming a context in full
	prefixes map[string]bool // LIST: queries ending in ':'
}

func newMetaQuery(opt Opt, queries []string) metaQuery {
	q := metaQuery{all: opt == OptListMetaContext && len(queries) == 0, names: map[string]bool{}, prefixes: map[string]bool{}}
	for _, s := range queries {
		switch {
		case strings.HasSuffix(s, ":"):
			if opt == OptListMetaContext {
				q.prefixes[s] = true
			}
		default:
			q.names[s] = true
		}
	}
	return q
}

// matches reports whether the context named n answers the query. A
// wildcard is looked up by n's own prefixes that end in ':' ("qemu:" and
// "qemu:dirty-bitmap:" of "qemu:dirty-bitmap:a"), so the work is bounded
// by the length of n, however many queries the client sent.
func (q metaQuery) matches(n string) bool {
	if q.all || q.names[n] {
		return true
	}
	if len(q.prefixes) == 0 {
		return false
	}
	for i := 0; i < len(n); i++ {
		if n[i] == ':' && q.prefixes[n[:i+1]] {
			return true
		}
	}
	return false
}

// optMetaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
//
//	C: u32 name length, name, u32 number of queries, (u32 length, query)*
//
// The selection is per connection and replaced by every SET, even a failed
// one. Ids are given in the order of the export's list, from 1; LIST
// answers id 0.
func (c *conn) optMetaContext(opt Opt, data []byte) error {
	if opt == OptSetMetaContext {
		c.meta, c.metaExp = nil, nil
	}
	if !c.structured {
		return c.optReply(opt, RepErrInvalid, []byte("structured replies not negotiated"))
	}
	p := parser{b: data}
	name, ok := p.str()
	nq, ok2 := p.u32()
	if !ok || !ok2 || uint64(nq)*4 > uint64(len(p.b)) {
		return c.optReply(opt, RepErrInvalid, []byte("malformed request"))
	}
	queries := make([]string, 0, nq)
	for i := uint32(0); i < nq; i++ {
		q, ok := p.str()
		if !ok {
			return c.optReply(opt, RepErrInvalid, []byte("malformed query"))
		}
		queries = append(queries, q)
	}
	if len(p.b) != 0 {
		return c.optReply(opt, RepErrInvalid, []byte("trailing bytes"))
	}
	ex, found := c.s.lookup(name)
	if !found {
		return c.optReply(opt, RepErrUnknown, []byte("no such export"))
	}
	if !c.allowed(ex) {
		return c.refuse(opt, ex)
	}
	q := newMetaQuery(opt, queries)
	var matched []selectedContext
	for _, sc := range c.metaContexts(ex) {
		if q.matches(sc.name) {
			matched = append(matched, sc)
		}
	}
	if opt == OptSetMetaContext && len(matched) > maxSelectedContexts {
		return c.optReply(opt, RepErrTooBig, []byte("too many meta contexts selected"))
	}
	for i := range matched {
		if opt == OptSetMetaContext {
			matched[i].id = uint32(i + 1) // LIST: reserved, zero
		}
		b := make([]byte, 4+len(matched[i].name))
		binary.BigEndian.PutUint32(b, matched[i].id)
		copy(b[4:], matched[i].name)
		if err := c.optReply(opt, RepMetaContext, b); err != nil {
			return err
		}
	}
	if opt == OptSetMetaContext {
		c.meta, c.metaExp = matched, ex
	}
	return c.optReply(opt, RepAck, nil)
}
