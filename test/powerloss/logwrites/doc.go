// Package logwrites reads the log written by the Linux device-mapper target
// dm-log-writes and replays it onto an image of the logged device.
//
// A power-loss test runs its workload, inside a VM, on a dm-log-writes device
// that passes every I/O to a data disk and appends every write, FLUSH, FUA
// write, discard and mark that reached the data disk to a log on a second
// disk. On the host, [Open] reads that log and a [Replayer] rebuilds the data
// device as it was right after any entry, going forward once: apply entries
// 0..k, check the image, apply k+1..m, check again, and so on.
//
// # On-disk format
//
// The format below was checked against drivers/md/dm-log-writes.c in the
// Linux tree as of kernel 6.1 (target version 1.1.0, log version 1); the
// kernel documents the target in
// Documentation/admin-guide/device-mapper/log-writes.rst. All integers are
// little endian.
//
// The log is a sequence of blocks of SectorSize bytes, where SectorSize is
// the logical block size of the data device (512 or 4096 in practice; the
// kernel takes it from bdev_logical_block_size, so it is a power of two of
// at least 512). Block 0 holds the super block, struct log_write_super:
//
//	offset size field
//	     0    8 magic       0x6a736677736872
//	     8    8 version     1
//	    16    8 nr_entries  number of entries in the log
//	    24    4 sectorsize  SectorSize, in bytes
//
// The rest of block 0 is padding; its first 4 bytes (the C struct's tail
// padding) come from the kernel stack and are not necessarily zero.
//
// Entry 0 starts at byte offset SectorSize. Each entry is one header block
// followed by its data. The header block starts with struct log_write_entry
//
//	offset size field
//	     0    8 sector      first sector written or discarded
//	     8    8 nr_sectors  number of sectors written or discarded
//	    16    8 flags       FLUSH 1<<0, FUA 1<<1, DISCARD 1<<2, MARK 1<<3,
//	                        METADATA 1<<4
//	    24    8 data_len    length of the mark's text, 0 for other entries
//
// and the rest of the block is zero, except that a mark's text (data_len
// bytes, no terminating NUL) immediately follows the 32-byte header in the
// same block. The kernel cuts a mark's text to SectorSize-33 bytes, so the
// text always fits in its block.
//
// sector and nr_sectors count device sectors of SectorSize bytes, not the
// 512-byte units of the block layer: the kernel converts with
// bio_to_dev_sectors (shift right by log2(SectorSize)-9) before filling the
// entry, and back with dev_to_bio_sectors when it places log blocks. So an
// entry covers bytes [sector*SectorSize, (sector+nr_sectors)*SectorSize) of
// the data device.
//
// The data of a write, nr_sectors*SectorSize bytes, follows its header block
// directly, and the next entry starts right after it. A discard carries no
// data: its nr_sectors says how much was discarded, and the next entry
// starts right after its header block. A mark (flags exactly MARK,
// nr_sectors 0) and a bare flush (FLUSH, nr_sectors 0) are one block each.
// A FLUSH or FUA entry with nr_sectors > 0 is a write and carries data like
// any other write. Entries are in the order the kernel considers them
// durable: plain writes and discards completed before a FLUSH are logged
// when that FLUSH completes, just before it; FUA writes as they complete;
// writes still unflushed when the target is removed, at the end.
//
// The kernel counts entries as it places them and rewrites the super block
// with that count as nr_entries after logging each FUA entry and each mark;
// removing the target logs a final mark, "dm-log-writes-end", and so
// updates it a last time. Entries
// placed after the last super block update are invisible to a reader: a
// test must remove the dm device cleanly (dmsetup remove) before reading
// the log. If the log device fills up, the kernel stops logging (its status
// line says "logging_disabled") and the log ends early. log_one_block can
// write data_len bytes of inline data after the header block of an entry
// that is not a mark, but in 6.1 only marks set data_len, so such entries
// are rejected.
//
// # Validation
//
// Open checks everything it computes from the log against the log's size
// before using it: nr_entries may not exceed the number of blocks after the
// super block, every header block and every write's data must lie inside the
// log, offsets and lengths on the data device must not overflow an int64,
// and a header block's padding must be zero. A truncated or garbage log
// gives a [*FormatError] naming the entry and its byte offset in the log,
// never a panic, and memory use is bounded by the log's size, never by a
// field read from it. The Replayer reads and writes in chunks of at most
// 1 MiB, whatever the size of an entry.
package logwrites
