package smolvm

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/store"
)

// A full disk is an error that wraps unix.ENOSPC (test it with
// errors.Is(err, syscall.ENOSPC)) and names the folder whose file system
// is full, how much it has free and what to do.

// freeBytes is the space unprivileged writers have left on dir's file
// system.
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// noSpace explains err when it is a full disk under dir (ENOSPC, or
// SQLite's SQLITE_FULL); any other err, or nil, it returns as it is:
// "no space left on DIR (N free): free space there or FIX: ERR".
func noSpace(dir string, err error, fix string) error {
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
	if n, ferr := freeBytes(dir); ferr == nil {
		free = sizeString(n)
	}
	return fmt.Errorf("%w on %s (%s free): free space there or %s: %w", errNoSpace, dir, free, fix, err)
}

// errNoSpace marks an error noSpace has explained.
var errNoSpace = errors.New("no space left")

// stateFix is what to do when the state folder's disk is full.
const stateFix = "set SMOLVM_HOME to a folder on another disk"

// minStateFree is the free space a new VM needs in the state folder: room
// for its files (logs, sockets, spec) and for the database to record it
// and, should the create fail, to undo that. With less, undoing a failed
// create could itself fail for want of space and leave its row behind.
const minStateFree = 16 << 20

// checkStateSpace refuses a new VM when the state folder's disk has less
// than minStateFree.
func checkStateSpace(home string) error {
	free, err := freeBytes(home)
	if err != nil || free >= minStateFree {
		return nil
	}
	return fmt.Errorf("%w on %s (%s free, a new VM needs %s): free space there or %s: %w",
		errNoSpace, home, sizeString(free), sizeString(minStateFree), stateFix, unix.ENOSPC)
}

// checkSpace refuses to write need bytes into dir when its file system has
// less free.
func checkSpace(dir string, need int64, what, fix string) error {
	free, err := freeBytes(dir)
	if err != nil || need <= free {
		return nil // unknown: the writes will tell
	}
	return fmt.Errorf("not enough space on %s for %s: it needs %s, %s free: free space there or %s: %w",
		dir, what, sizeString(need), sizeString(free), fix, unix.ENOSPC)
}

// sizeString is n bytes for people: "10 GiB (10737418240 bytes)".
func sizeString(n int64) string {
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

// holeBlock is the unit in which a copy out of a guest looks for zeros:
// a block of zeros is left as a hole in the host's file.
const holeBlock = 4096

var zeroBlock = make([]byte, holeBlock)

// sparseFile writes a file whose blocks of zeros become holes. Writes go
// at increasing offsets; finish sets the file's size.
type sparseFile struct {
	f   *os.File
	end int64 // the end of what was written, holes included
}

// WriteAt writes p at off, skipping the holeBlock-aligned blocks of
// zeros in it.
func (s *sparseFile) WriteAt(p []byte, off int64) error {
	for len(p) > 0 {
		// Up to the next block boundary of the file.
		k := min(int64(len(p)), holeBlock-off%holeBlock)
		if !bytes.Equal(p[:k], zeroBlock[:k]) {
			// A run of blocks with data, written at once.
			for k < int64(len(p)) {
				n := min(int64(len(p))-k, holeBlock)
				if bytes.Equal(p[k:k+n], zeroBlock[:n]) {
					break
				}
				k += n
			}
			if _, err := s.f.WriteAt(p[:k], off); err != nil {
				return err
			}
		}
		p, off = p[k:], off+k
		s.end = max(s.end, off)
	}
	return nil
}

// Write appends p at the end.
func (s *sparseFile) Write(p []byte) (int, error) {
	if err := s.WriteAt(p, s.end); err != nil {
		return 0, err
	}
	return len(p), nil
}

// finish gives the file its size (holes at the end included).
func (s *sparseFile) finish(size int64) error {
	return s.f.Truncate(max(size, s.end))
}

// createTemp creates an empty file beside rel in root, under a hidden
// name of its own, to be renamed to rel once complete.
func createTemp(root *os.Root, rel string) (*os.File, string, error) {
	base := path.Base(rel)
	if len(base) > 200 {
		base = base[:200]
	}
	for {
		var b [6]byte
		_, _ = rand.Read(b[:])
		tmp := path.Join(path.Dir(rel), "."+base+".smolvm-"+hex.EncodeToString(b[:]))
		f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		return f, tmp, err
	}
}
