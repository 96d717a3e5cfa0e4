package engine

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/store"
)

// A full disk is an error that wraps unix.ENOSPC (test it with
// errors.Is(err, syscall.ENOSPC)) and names the folder whose file system
// is full, how much it has free and what to do.

// FreeBytes is the space unprivileged writers have left on dir's file
// system.
func FreeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// NoSpace explains err when it is a full disk under dir (ENOSPC, or
// SQLite's SQLITE_FULL); any other err, or nil, it returns as it is:
// "no space left on DIR (N free): free space there or FIX: ERR".
func NoSpace(dir string, err error, fix string) error {
	if err == nil || errors.Is(err, errNoSpace) {
		return err
	}
	if !errors.Is(err, unix.ENOSPC) {
		if !store.IsFull(err) {
			return err
		}
		err = fmt.Errorf("%w (%w)", err, unix.ENOSPC)
	}
	free := "?"
	if n, ferr := FreeBytes(dir); ferr == nil {
		free = SizeString(n)
	}
	return fmt.Errorf("%w on %s (%s free): free space there or %s: %w", errNoSpace, dir, free, fix, err)
}

// errNoSpace marks an error NoSpace has explained.
var errNoSpace = errors.New("no space left")

// StateFix is what to do when the state folder's disk is full.
const StateFix = "set SMOLVM_HOME to a folder on another disk"

// MinStateFree is the free space a new VM needs in the state folder: room
// for its files (logs, sockets, spec) and for the database to record it
// and, should the create fail, to undo that. With less, undoing a failed
// create could itself fail for want of space and leave its row behind.
const MinStateFree = 16 << 20

// CheckStateSpace refuses a new VM when the state folder's disk has less
// than MinStateFree.
func CheckStateSpace(home string) error {
	free, err := FreeBytes(home)
	if err != nil || free >= MinStateFree {
		return nil
	}
	return fmt.Errorf("%w on %s (%s free, a new VM needs %s): free space there or %s: %w",
		errNoSpace, home, SizeString(free), SizeString(MinStateFree), StateFix, unix.ENOSPC)
}

// CheckSpace refuses to write need bytes into dir when its file system has
// less free.
func CheckSpace(dir string, need int64, what, fix string) error {
	free, err := FreeBytes(dir)
	if err != nil || need <= free {
		return nil // unknown: the writes will tell
	}
	return fmt.Errorf("not enough space on %s for %s: it needs %s, %s free: free space there or %s: %w",
		dir, what, SizeString(need), SizeString(free), fix, unix.ENOSPC)
}

// SizeString is n bytes for people: "10 GiB (10737418240 bytes)".
func SizeString(n int64) string {
	units := []string{"bytes", "KiB", "MiB", "GiB", "TiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v, i = v/1024, i+1
	}
	if i == 0 {
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%.1f %s (%d bytes)", v, units[i], n)
}
