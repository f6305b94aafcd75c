package backstore

import (
	"errors"
	"fmt"

	"github.com/google/uuid"

	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// This file holds what an owner does to a store file that is not open as
// a Store: find out whose it is, record that it turned invalid, destroy its
// headers. Each first proves, by the UUID, that the file holds the store the
// owner means, so that a file put at a recorded path by someone else (a
// user's file, another snapshot's store) is never changed.

// writeHeaderSlot writes h into the slot its generation selects (the one
// that does not hold the current header, whose generation is one less) and
// syncs. The current header stays intact in the other slot, so a torn write
// loses nothing.
func writeHeaderSlot(f vfs.File, h *Header) error {
	buf := make([]byte, headerSize)
	encodeHeader(h, buf)
	slot := int64(h.Generation % 2)
	if _, err := f.WriteAt(buf, slot*headerSize); err != nil {
		return fmt.Errorf("write header slot %d: %w", slot, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync header: %w", err)
	}
	return nil
}

// Identify returns the current header of the store in f, without writing
// anything. It fails with ErrNotStore when neither header slot is valid
// (not a store, or a store whose headers were wiped), ErrVersion for a newer
// format, and ErrCorrupt when the slots belong to different stores.
func Identify(f vfs.File) (Header, error) {
	h, _, err := readHeader(f)
	if err != nil {
		return Header{}, fmt.Errorf("backstore: %w", err)
	}
	return h, nil
}

// MarkInvalid records durably in the header of the store in f that it is
// invalid for reason (cut to 2048 bytes), as Invalidate does for an open
// Store. The store must not be open. It changes nothing and fails with
// ErrOtherStore unless the current header's UUID is id; a store already
// invalid with a reason keeps it.
func MarkInvalid(f vfs.File, id uuid.UUID, reason string) error {
	h, err := Identify(f)
	if err != nil {
		return err
	}
	if h.UUID != id {
		return fmt.Errorf("backstore: mark invalid: %w: store %s (snapshot %q), not %s", ErrOtherStore, h.UUID, h.Name, id)
	}
	if h.State == StateInvalid && h.Reason != "" {
		return nil
	}
	h.State, h.Reason = StateInvalid, truncateUTF8(reason, maxReasonLen)
	h.Generation++
	if err := writeHeaderSlot(f, &h); err != nil {
		return fmt.Errorf("backstore: mark invalid: %w", err)
	}
	return nil
}

// Wipe zeroes both header slots of the store in f and syncs, so that
// nothing can open it again (Open and Identify then fail with
// ErrNotStore); the rest of the file is left as it is. It is how a store on
// a block device, which is never deleted, is retired. It changes nothing
// and fails with ErrOtherStore (or ErrNotStore) unless a header slot holds
// a valid header with UUID id: either slot, because a Create torn by a
// crash may have written only one of them.
func Wipe(f vfs.File, id uuid.UUID) error {
	buf := make([]byte, 2*headerSize)
	if err := readFull(f, buf, 0); err != nil {
		return fmt.Errorf("backstore: wipe: read header: %w", err)
	}
	var errs []error
	ours := false
	for i := 0; i < 2; i++ {
		h, err := decodeHeader(buf[i*headerSize : (i+1)*headerSize])
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("slot %d: %w", i, err))
		case h.UUID == id:
			ours = true
		default:
			errs = append(errs, fmt.Errorf("slot %d: %w: store %s (snapshot %q)", i, ErrOtherStore, h.UUID, h.Name))
		}
	}
	if !ours {
		if len(errs) == 2 && errors.Is(errs[0], ErrNotStore) && errors.Is(errs[1], ErrNotStore) {
			return fmt.Errorf("backstore: wipe: %w", ErrNotStore)
		}
		return fmt.Errorf("backstore: wipe: no header of store %s: %w", id, errors.Join(errs...))
	}
	clear(buf)
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("backstore: wipe: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("backstore: wipe: sync: %w", err)
	}
	return nil
}
