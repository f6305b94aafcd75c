// Package devinfo answers "what is this file or block device": a stable
// [Identity] of a daemon's origin, recorded when a snapshot is created and
// checked at every restart, and the [Signatures] of data already on a
// block device, so that the daemon neither mistakes another disk for its
// origin nor overwrites a device a user still has data on.
//
// # Why an identity, and what goes in it
//
// A path names whatever is there now. After a reboot /dev/sdb can be
// another disk of the same size, and a loop device can be re-attached to
// another image; a snapshot that took such a device for its origin would
// hand out a "frozen" view mixing two disks. So [Of] records what the
// kernel itself knows about the device, and [Match] compares that record
// with what is at the path now.
//
// Only values that stay the same across reboots of the same machine and
// hardware go into [Identity.Keys]: never the diskseq, the /dev/sdX name or
// the major:minor of the block device itself, which the kernel hands out
// afresh at every boot or attach.
//
// For a regular file the keys are the file system holding it (dev, the
// st_dev as MAJ:MIN, and fsid, statfs's f_fsid) and the inode (ino, plus
// btime, the birth time from statx, and gen, the inode generation from
// FS_IOC_GETVERSION, where the file system reports them). A file deleted
// and recreated at the same path with the same size may get the same inode
// number back; its birth time and generation differ.
//
// For a block device the keys are the kernel's own identifiers, read from
// sysfs (/sys/dev/block/MAJ:MIN): wwid, serial, dm.uuid and md.uuid of the
// disk, plus, for a partition, part (its number and start sector) and, for
// a loop device, loop (the device and inode of the backing file, offset and
// size limit, from LOOP_GET_STATUS64). udev is deliberately not used:
// /run/udev and /dev/disk/by-id do not exist in many containers and
// minimal systems, while sysfs always does and holds the same identifiers
// udev derives its names from.
//
// # Match rules
//
// Files match when kind, size and ino are equal, btime and gen are equal
// where both sides have them, and the file system is the same: dev equal,
// or fsid present on both sides and equal (on btrfs, xfs and network file
// systems st_dev can change between boots while the fsid does not).
//
// Block devices match when kind and size are equal; the structural keys
// (part, loop) are present on both sides or neither, and equal; every
// disk-name key present on both sides is equal; and, if the recorded
// identity has any disk name, the current one shares at least one of them.
// A name present on one side only is not itself a mismatch because which
// attributes sysfs shows can change with the kernel version (a newer
// kernel may add a wwid); the shared name still has to agree.
//
// # The weak case
//
// Some block devices (zram, nbd, many USB sticks, a partition of such a
// disk) have no kernel identifier at all. Their identity holds only the
// size (and a partition's position), so a different device of the same
// size cannot be told apart. [Identity.Weak] reports this, and callers log
// a warning rather than refuse: the user chose the path.
//
// Caveats: a loop device's identity names its backing file by the st_dev of
// the file system holding it, so on file systems whose st_dev changes
// between boots (btrfs subvolumes, some network file systems) a re-attached
// loop device does not match after a reboot. Dynamically allocated majors
// (virtio-blk, nbd) are stable only while the kernel and its modules load
// in the same order.
//
// # Signatures
//
// [Signatures] runs wipefs(8) --no-act: it lists every signature libblkid
// knows (file systems, partition tables, RAID and LVM members, swap, LUKS)
// without changing the device. When wipefs is missing or fails the error
// says so, and callers refuse the device unless the user forces it.
//
// Concurrency: the package has no state; every function may be called from
// any goroutine.
package devinfo
