package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/nbdsnap/nbdsnap/internal/backstore"
	"github.com/nbdsnap/nbdsnap/internal/control"
	"github.com/nbdsnap/nbdsnap/internal/cow"
	"github.com/nbdsnap/nbdsnap/internal/devinfo"
	"github.com/nbdsnap/nbdsnap/internal/vfs"
)

// A backing store is a regular file the daemon creates, or a block device
// the user names. The rule for both: nothing is written to, wiped or
// deleted unless it is provably the snapshot's own store, by its UUID.
//
// A new file store is created under a staging name that holds the store's
// UUID (stagingPath), and renamed to the backing path without replacing
// anything once the create instant has passed. So a file at the backing
// path always carries a durable header with the snapshot's UUID, and a
// crash mid-create leaves at most a staging file that nobody else could
// have made, which the restart deletes.
//
// A device store is used whole; the device is refused if it carries any
// sign of data (a file system, a partition table, a RAID or LVM member,
// swap, LUKS, another nbdsnap store) unless the user forces it. Clear wipes
// its header durably instead of deleting it.

func isBlockDevice(fi os.FileInfo) bool {
	return fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
}

// stagingPath is where a file store with UUID id is created before it is
// renamed to path.
func stagingPath(path string, id uuid.UUID) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+"."+id.String()+".nbdsnap-creating")
}

// openDevice opens a block device read-write and exclusively: Linux refuses
// O_EXCL while the device is mounted, part of a RAID/LVM, or held by anyone
// else with O_EXCL.
func openDevice(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|syscall.O_EXCL|syscall.O_CLOEXEC, 0)
}

func osFile(f *os.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return vf, nil
}

// createBacking opens the store of a new snapshot: a new staging file, or
// the block device, after checking that it holds nothing (unless force).
func createBacking(ctx context.Context, rec snapRecord, force bool) (vfs.File, error) {
	if rec.Device {
		f, err := openDevice(rec.BackingPath)
		if err != nil {
			return nil, err
		}
		if !force {
			if err := checkDeviceBlank(ctx, f, rec.BackingPath); err != nil {
				f.Close()
				return nil, err
			}
		}
		return osFile(f, nil)
	}
	return osFile(os.OpenFile(stagingPath(rec.BackingPath, rec.storeUUID()), os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_CLOEXEC, 0o600))
}

// checkDeviceBlank refuses a device that carries a sign of data: whatever
// wipefs(8) finds, or an nbdsnap store's header.
func checkDeviceBlank(ctx context.Context, f *os.File, path string) error {
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		return err
	}
	var found []string
	if h, err := backstore.Identify(vf); err == nil || errors.Is(err, backstore.ErrCorrupt) || errors.Is(err, backstore.ErrVersion) {
		what := "an nbdsnap backing store"
		if err == nil {
			what = fmt.Sprintf("the nbdsnap backing store of snapshot %q (store %s, taken %s)", h.Name, h.UUID, h.Created.Format("2006-01-02 15:04:05 MST"))
		}
		found = append(found, what)
	}
	sigs, err := devinfo.Signatures(ctx, path)
	if err != nil {
		return refusal{control.ErrInvalid, fmt.Sprintf("backing device %s: cannot check it for data (%v); use --force to use it anyway", path, err)}
	}
	for _, s := range sigs {
		found = append(found, s.String())
	}
	if len(found) > 0 {
		return refusal{control.ErrExists, fmt.Sprintf("backing device %s holds %s; it would be overwritten: wipe it first (wipefs -a %s), or use --force",
			path, strings.Join(found, ", "), path)}
	}
	return nil
}

// refusal is a refused request whose message stands on its own, classified
// for the control API by kind (a control sentinel), which it does not repeat.
type refusal struct {
	kind error
	msg  string
}

func (r refusal) Error() string { return r.msg }
func (r refusal) Unwrap() error { return r.kind }

// placeBacking moves a new file store from its staging name to its backing
// path, without replacing anything there, and makes the rename durable.
func placeBacking(rec snapRecord) error {
	if rec.Device {
		return nil
	}
	from := stagingPath(rec.BackingPath, rec.storeUUID())
	if err := renameNoReplace(from, rec.BackingPath); err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("backing file %s %w (created while the snapshot was being taken)", rec.BackingPath, control.ErrExists)
		}
		return fmt.Errorf("backing file %s: %w", rec.BackingPath, err)
	}
	return syncDir(filepath.Dir(rec.BackingPath))
}

// renameNoReplace renames from to to, failing with an error matching
// os.ErrExist if to exists. File systems without RENAME_NOREPLACE get
// link and unlink, which refuse an existing target just the same.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
		if err != nil {
			return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
		}
		return nil
	}
	if err := os.Link(from, to); err != nil {
		return err
	}
	return os.Remove(from)
}

// storeMatches reports whether h is the header of rec's store: by UUID, or
// for a version 1 record (no UUID) by snapshot name and origin ID.
func storeMatches(rec snapRecord, h backstore.Header, originID string) bool {
	if id := rec.storeUUID(); id != (uuid.UUID{}) {
		return h.UUID == id
	}
	return h.Name == rec.Name && h.OriginID == originID
}

// retireBacking gets rid of rec's store, which nobody uses any more: a
// file is deleted, a device's header wiped. Anything that does not prove to
// be that store is left alone, and kept says what and why. It also removes
// the staging file of a create that did not finish.
func retireBacking(rec snapRecord, originID string) (kept string, err error) {
	if !rec.Device {
		if id := rec.storeUUID(); id != (uuid.UUID{}) {
			if err := removeIfRegular(stagingPath(rec.BackingPath, id)); err != nil {
				return "", err
			}
		}
		return removeStoreFile(rec, originID)
	}
	f, err := openDevice(rec.BackingPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Sprintf("backing device %s is not there; nothing wiped", rec.BackingPath), nil
	case errors.Is(err, syscall.EBUSY):
		return fmt.Sprintf("kept backing device %s: it is in use by another program; nothing wiped", rec.BackingPath), nil
	case err != nil:
		return "", fmt.Errorf("backing device %s: %w", rec.BackingPath, err)
	}
	defer f.Close()
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		return "", err
	}
	h, err := backstore.Identify(vf)
	if err != nil || !storeMatches(rec, h, originID) {
		// A torn create leaves one header slot of ours: Wipe checks each.
		if id := rec.storeUUID(); id != (uuid.UUID{}) {
			if werr := backstore.Wipe(vf, id); werr == nil {
				return "", nil
			}
		}
		return fmt.Sprintf("kept backing device %s as it is: %s", rec.BackingPath, notOurs(h, err)), nil
	}
	if err := backstore.Wipe(vf, h.UUID); err != nil {
		return "", fmt.Errorf("backing device %s: %w", rec.BackingPath, err)
	}
	return "", nil
}

// removeStoreFile deletes rec's store file if its header proves it is the
// store, and it is still the same file when it is unlinked.
func removeStoreFile(rec snapRecord, originID string) (kept string, err error) {
	path := rec.BackingPath
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", nil
	case errors.Is(err, syscall.ELOOP):
		return fmt.Sprintf("kept %s: it is a symbolic link, not a store this daemon created", path), nil
	case err != nil:
		return "", fmt.Errorf("backing file %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("backing file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Sprintf("kept %s: it is not a regular file", path), nil
	}
	vf, err := vfs.NewOSFile(f)
	if err != nil {
		return "", err
	}
	h, err := backstore.Identify(vf)
	if err != nil || !storeMatches(rec, h, originID) {
		return fmt.Sprintf("kept %s: %s", path, notOurs(h, err)), nil
	}
	now, err := os.Lstat(path)
	if err != nil || !os.SameFile(fi, now) {
		return fmt.Sprintf("kept %s: it was replaced while being checked", path), nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("remove backing file: %w", err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return "", err
	}
	return "", nil
}

// notOurs says why a file at a store's path is not that store.
func notOurs(h backstore.Header, err error) string {
	switch {
	case errors.Is(err, backstore.ErrNotStore):
		return "it is not an nbdsnap backing store (not this snapshot's)"
	case err != nil:
		return fmt.Sprintf("cannot tell whose store it is (%v)", err)
	}
	return fmt.Sprintf("it holds the store of snapshot %q (store %s), not this snapshot's", h.Name, h.UUID)
}

// removeIfRegular deletes path if it is a regular file (not a link).
func removeIfRegular(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// openStore opens an existing store for a restart: a file read-write, a
// device exclusively. A symbolic link is followed (a store moved to another
// file system and linked back): what is opened is trusted only once its
// header's UUID proved it is the snapshot's store.
func openStore(rec snapRecord) (vfs.File, error) {
	if rec.Device {
		return osFile(openDevice(rec.BackingPath))
	}
	return osFile(os.OpenFile(rec.BackingPath, os.O_RDWR|syscall.O_CLOEXEC, 0))
}

// backingError turns a failure to create the backing store into the line a
// user needs.
func backingError(path string, err error) error {
	switch {
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("backing path %s is on a read-only filesystem", path)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("no space for backing store %s: filesystem full", path)
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("backing device %s is in use (mounted, or opened exclusively by another program)", path)
	case errors.Is(err, syscall.EEXIST):
		return fmt.Errorf("backing file %s %w", path, control.ErrExists)
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("%w: directory of backing path %s does not exist", control.ErrInvalid, path)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("backing path %s: permission denied", path)
	case errors.Is(err, cow.ErrBadOption):
		return fmt.Errorf("%w: %w", control.ErrInvalid, err)
	case errors.Is(err, cow.ErrExists):
		return fmt.Errorf("%w: %w", control.ErrExists, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return fmt.Errorf("create abandoned before its instant (%w): nothing was created", err)
	}
	if errors.Is(err, control.ErrExists) || errors.Is(err, control.ErrInvalid) {
		return err
	}
	return fmt.Errorf("create backing store %s: %w", path, err)
}
