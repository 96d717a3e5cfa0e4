// Package tarx extracts tar streams under a directory safely. The host uses
// it for a guest's archives (cp out of a VM, ExtractArchive), the guest
// agent for a caller's (cp into a VM): one set of rules for both.
//
// Every file system call goes through an os.Root opened on the target, so
// nothing outside it is created, replaced, linked to or followed, whatever
// the archive's names, symlinks and hard links say and whatever changes
// beside the extraction. Names that climb out (".."), absolute names
// (unless Options.StripSlash), entries written through a symlink (unless
// Options.FollowLinks, and then only to a directory inside the target),
// hard links to anything but a regular file of the target, and sparse
// entries (unless Options.AllowSparse) are refused; devices, FIFOs and
// other special files are skipped; setuid and setgid bits are dropped
// unless Options.KeepSetID. The number of entries and a name's length are
// bounded.
package tarx

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultMaxEntries is the most entries an archive may hold when
// Options.MaxEntries is 0.
const DefaultMaxEntries = 1 << 20

// MaxNameLen is the longest entry name (and hard link target) accepted:
// Linux's PATH_MAX.
const MaxNameLen = 4096

// maxLinkDepth bounds the symlinks followed to resolve one parent
// directory (Options.FollowLinks), as the kernel's ELOOP does.
const maxLinkDepth = 40

// Kind says what an Error is about.
type Kind int

const (
	// Refused: the archive asks for something unsafe or impossible (an
	// escape, a bad name, a link to outside, a sparse file, too many
	// entries). Error.Why says what.
	Refused Kind = iota + 1
	// Conflict: a directory is where the archive puts something else.
	Conflict
	// BadStream: the bytes are not a valid tar stream.
	BadStream
	// FS: a file system call failed. Error.Op and Error.Path say which.
	FS
)

// Error is an extraction's failure. Each user of the package turns it into
// its own error (a sentinel of the library, a gRPC status).
type Error struct {
	Kind    Kind
	Name    string // the archive entry
	Why     string // Refused: the reason
	Op      string // FS: the operation ("create", "replace", "symlink", ...)
	Path    string // FS, Conflict: the path, relative to the target
	Entries int64  // BadStream: the entries extracted before
	Err     error  // FS, BadStream: the cause
}

func (e *Error) Error() string {
	switch e.Kind {
	case Refused:
		return fmt.Sprintf("refusing archive entry %q: %s", e.Name, e.Why)
	case Conflict:
		return fmt.Sprintf("archive entry %q: %s is a directory", e.Name, e.Path)
	case BadStream:
		return fmt.Sprintf("bad tar stream after %d entries: %v", e.Entries, e.Err)
	default:
		return fmt.Sprintf("%s %s: %v", e.Op, e.Path, e.Err)
	}
}

func (e *Error) Unwrap() error { return e.Err }

// Options set the rules of an extraction beyond the common ones.
type Options struct {
	// StripSlash takes a name with a leading "/" relative to the target,
	// as tar does; without it such a name is refused.
	StripSlash bool
	// FollowLinks follows a parent directory that is a symlink when it
	// resolves to a directory inside the target (RootPath names the
	// target's real absolute path, against which absolute symlinks are
	// resolved); without it an entry written through a symlink is refused.
	FollowLinks bool
	RootPath    string
	// KeepSetID keeps setuid and setgid bits.
	KeepSetID bool
	// AllowSparse writes sparse entries out, holes as zeros; without it
	// they are refused (a few blocks of archive can claim terabytes).
	AllowSparse bool
	// MaxEntries bounds the entries (0: DefaultMaxEntries).
	MaxEntries int64
	// Rename maps an entry's checked, cleaned name to the path it is
	// written at, relative to the target (nil: the name). What it returns
	// is checked again.
	Rename func(name string) (string, error)
	// WriteFile writes a regular file of size bytes from r at rel with
	// mode and mtime, replacing a non-directory there without following
	// it, and returns the bytes written (nil: a plain write, see
	// WriteRegular). An error it returns is returned as it is.
	WriteFile func(root *os.Root, rel string, mode fs.FileMode, mtime time.Time, r io.Reader, size int64) (int64, error)
	// PassThrough reports whether an error of the stream's reader is the
	// transport's own, returned as it is rather than as a BadStream.
	PassThrough func(error) bool
}

// Stats counts what an extraction wrote.
type Stats struct {
	Entries int64 // entries extracted (skipped ones are not counted)
	Bytes   int64 // bytes of regular files
}

// Extract extracts the tar stream r under root.
func Extract(r io.Reader, root *os.Root, o Options) (Stats, error) {
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	x := &extractor{root: root, o: o}
	rr := &readErr{r: r}
	tr := tar.NewReader(rr)
	var seen int64
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return x.stats, x.streamErr(rr, err)
		}
		if seen++; seen > o.MaxEntries {
			return x.stats, x.refuse(h.Name, fmt.Sprintf("the archive holds more than %d entries", o.MaxEntries))
		}
		if err := x.extract(h, tr, rr); err != nil {
			return x.stats, err
		}
	}
	return x.stats, x.finish()
}

// readErr remembers the last error of the stream's reader, to tell it
// from an error of the file system during a copy.
type readErr struct {
	r   io.Reader
	err error
}

func (r *readErr) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		r.err = err
	}
	return n, err
}

type dirMeta struct {
	rel   string
	mode  fs.FileMode
	mtime time.Time
}

type extractor struct {
	root  *os.Root
	o     Options
	stats Stats
	dirs  []dirMeta
}

func (x *extractor) refuse(name, why string) error {
	return &Error{Kind: Refused, Name: name, Why: why}
}

func fsErr(name, op, rel string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		err = le.Err
	}
	return &Error{Kind: FS, Name: name, Op: op, Path: rel, Err: err}
}

// streamErr is what a failed read of the stream returns: the transport's
// own error as it is, anything else as a BadStream.
func (x *extractor) streamErr(rr *readErr, err error) error {
	if rr.err != nil && x.o.PassThrough != nil && x.o.PassThrough(rr.err) {
		return rr.err
	}
	if x.o.PassThrough != nil && x.o.PassThrough(err) {
		return err
	}
	return &Error{Kind: BadStream, Entries: x.stats.Entries, Err: err}
}

// entryRel checks a tar name and returns the cleaned relative path it is
// written at ("." for the target itself).
func (x *extractor) entryRel(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, 0) {
		return "", x.refuse(name, "empty name or NUL byte")
	}
	if len(name) > MaxNameLen {
		return "", x.refuse(name[:64]+"...", fmt.Sprintf("a name of %d bytes (at most %d)", len(name), MaxNameLen))
	}
	if path.IsAbs(name) {
		if !x.o.StripSlash {
			return "", x.refuse(name, "absolute path")
		}
		name = strings.TrimLeft(name, "/")
		if name == "" {
			name = "."
		}
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", x.refuse(name, "it climbs out of the target directory")
	}
	if x.o.Rename == nil {
		return c, nil
	}
	rel, err := x.o.Rename(c)
	if err != nil {
		return "", x.refuse(name, err.Error())
	}
	rel = path.Clean(rel)
	if path.IsAbs(rel) || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", x.refuse(name, "it climbs out of the target directory")
	}
	return rel, nil
}

// parent makes sure the parent of rel is a directory (created when
// missing) and returns rel with that parent resolved: with FollowLinks,
// through the symlinks that stay inside the target; without, a symlink on
// the way is refused.
func (x *extractor) parent(name, rel string) (string, error) {
	dir := path.Dir(rel)
	if dir == "." {
		return rel, nil
	}
	if x.o.FollowLinks {
		d, err := x.resolveDir(name, dir, 0)
		if err != nil {
			return "", err
		}
		if err := x.root.MkdirAll(d, 0o755); err != nil {
			return "", fsErr(name, "create", d, err)
		}
		return path.Join(d, path.Base(rel)), nil
	}
	cur := ""
	for _, part := range strings.Split(dir, "/") {
		cur = path.Join(cur, part)
		fi, err := x.root.Lstat(cur)
		if errors.Is(err, fs.ErrNotExist) {
			if err := x.root.Mkdir(cur, 0o755); err != nil {
				return "", fsErr(name, "create", cur, err)
			}
			continue
		}
		if err != nil {
			return "", fsErr(name, "stat", cur, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return "", x.refuse(name, "it would be written through the symlink "+cur)
		}
		if !fi.IsDir() {
			return "", x.refuse(name, cur+" is not a directory")
		}
	}
	return rel, nil
}

// resolveDir resolves the directory rel through the symlinks on its way,
// as long as they stay inside the target. Missing components are kept as
// they are (they will be created).
func (x *extractor) resolveDir(name, rel string, depth int) (string, error) {
	if depth > maxLinkDepth {
		return "", x.refuse(name, "too many levels of symlinks")
	}
	cur := "."
	if rel == "." {
		return cur, nil
	}
	for _, part := range strings.Split(rel, "/") {
		next := path.Join(cur, part)
		fi, err := x.root.Lstat(next)
		if errors.Is(err, fs.ErrNotExist) {
			cur = next
			continue
		}
		if err != nil {
			return "", fsErr(name, "stat", next, err)
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		target, err := x.root.Readlink(next)
		if err != nil {
			return "", fsErr(name, "readlink", next, err)
		}
		var in string
		if path.IsAbs(target) {
			r, err := filepath.Rel(x.o.RootPath, filepath.Clean(target))
			if x.o.RootPath == "" || err != nil {
				return "", x.refuse(name, fmt.Sprintf("it goes through the symlink %s -> %s, outside the target directory", next, target))
			}
			in = filepath.ToSlash(r)
		} else {
			in = path.Join(cur, target)
		}
		if in == ".." || strings.HasPrefix(in, "../") {
			return "", x.refuse(name, fmt.Sprintf("it goes through the symlink %s -> %s, outside the target directory", next, target))
		}
		if cur, err = x.resolveDir(name, in, depth+1); err != nil {
			return "", err
		}
	}
	return cur, nil
}

// mode is the mode an entry gets: permission and sticky bits, setuid and
// setgid only with KeepSetID.
func (x *extractor) mode(h *tar.Header) fs.FileMode {
	m := fs.FileMode(h.Mode & 0o777)
	if h.Mode&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	if x.o.KeepSetID {
		if h.Mode&unix.S_ISUID != 0 {
			m |= fs.ModeSetuid
		}
		if h.Mode&unix.S_ISGID != 0 {
			m |= fs.ModeSetgid
		}
	}
	return m
}

// isSparse reports whether h is a sparse file in one of GNU's PAX formats
// (the reader turns the old GNU format's entries into TypeGNUSparse, which
// extraction skips).
func isSparse(h *tar.Header) bool {
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// extract writes one entry, never following a symlink at its final
// component.
func (x *extractor) extract(h *tar.Header, r io.Reader, rr *readErr) error {
	rel, err := x.entryRel(h.Name)
	if err != nil {
		return err
	}
	if !x.o.AllowSparse && isSparse(h) {
		return x.refuse(h.Name, "a sparse file")
	}
	switch h.Typeflag {
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeLink:
	default:
		return nil // devices, FIFOs and the like are skipped
	}
	if rel == "." {
		return nil // the target itself keeps its mode
	}
	if rel, err = x.parent(h.Name, rel); err != nil {
		return err
	}
	existing, lerr := x.root.Lstat(rel)
	exists := lerr == nil
	// replace removes a non-directory in the way (a symlink is removed,
	// not followed).
	replace := func() error {
		if !exists {
			return nil
		}
		if existing.IsDir() {
			return &Error{Kind: Conflict, Name: h.Name, Path: rel}
		}
		if err := x.root.Remove(rel); err != nil {
			return fsErr(h.Name, "replace", rel, err)
		}
		return nil
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if exists && !existing.IsDir() {
			if err := replace(); err != nil {
				return err
			}
			exists = false
		}
		if !exists {
			if err := x.root.Mkdir(rel, 0o700); err != nil {
				return fsErr(h.Name, "create", rel, err)
			}
		}
		x.dirs = append(x.dirs, dirMeta{rel, x.mode(h), h.ModTime})
	case tar.TypeReg:
		if exists && existing.IsDir() {
			return replace()
		}
		write := x.o.WriteFile
		if write == nil {
			write = WriteRegular
		}
		fr := &readErr{r: r} // the entry's reader: a failure there is the stream's
		n, err := write(x.root, rel, x.mode(h), h.ModTime, fr, h.Size)
		x.stats.Bytes += n
		if err != nil {
			if fr.err != nil {
				return x.streamErr(rr, fr.err)
			}
			return err
		}
	case tar.TypeSymlink:
		if err := replace(); err != nil {
			return err
		}
		if err := x.root.Symlink(h.Linkname, rel); err != nil {
			return fsErr(h.Name, "symlink", rel, err)
		}
		x.lchtimes(rel, h.ModTime)
	case tar.TypeLink:
		if len(h.Linkname) > MaxNameLen {
			return x.refuse(h.Name, "hard link target name too long")
		}
		lrel, err := x.entryRel(h.Linkname)
		if err != nil || lrel == "." {
			return x.refuse(h.Name, "hard link target "+h.Linkname+" is outside the archive")
		}
		if lrel, err = x.parent(h.Name, lrel); err != nil {
			return err
		}
		if fi, err := x.root.Lstat(lrel); err != nil || !fi.Mode().IsRegular() {
			return x.refuse(h.Name, "hard link target "+h.Linkname+" is missing or not a regular file")
		}
		if err := replace(); err != nil {
			return err
		}
		if err := x.root.Link(lrel, rel); err != nil {
			return fsErr(h.Name, "link", rel, err)
		}
	}
	x.stats.Entries++
	return nil
}

// lchtimes sets a symlink's times, through its parent directory opened in
// the root.
func (x *extractor) lchtimes(rel string, t time.Time) {
	if t.IsZero() {
		return
	}
	d, err := x.root.Open(path.Dir(rel))
	if err != nil {
		return
	}
	defer d.Close()
	ts := unix.NsecToTimespec(t.UnixNano())
	_ = unix.UtimesNanoAt(int(d.Fd()), path.Base(rel), []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
}

// finish applies directory modes and mtimes, deepest first, once their
// contents are written.
func (x *extractor) finish() error {
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		fi, err := x.root.Lstat(d.rel)
		if err != nil || !fi.IsDir() {
			continue // replaced by a later entry
		}
		if err := x.root.Chmod(d.rel, d.mode); err != nil {
			return fsErr(d.rel, "chmod", d.rel, err)
		}
		if !d.mtime.IsZero() {
			_ = x.root.Chtimes(d.rel, d.mtime, d.mtime)
		}
	}
	return nil
}

// WriteRegular is the plain WriteFile: whatever is at rel (not a
// directory) is removed, not followed, and a new file is written in its
// place. It returns the bytes written.
func WriteRegular(root *os.Root, rel string, mode fs.FileMode, mtime time.Time, r io.Reader, size int64) (int64, error) {
	if fi, err := root.Lstat(rel); err == nil && !fi.IsDir() {
		if err := root.Remove(rel); err != nil {
			return 0, fsErr(rel, "replace", rel, err)
		}
	}
	f, err := root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return 0, fsErr(rel, "create", rel, err)
	}
	n, err := io.Copy(f, r)
	if err != nil {
		f.Close()
		return n, fsErr(rel, "write", rel, err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return n, fsErr(rel, "chmod", rel, err)
	}
	if !mtime.IsZero() {
		tv := []unix.Timeval{unix.NsecToTimeval(mtime.UnixNano()), unix.NsecToTimeval(mtime.UnixNano())}
		_ = unix.Futimes(int(f.Fd()), tv)
	}
	if err := f.Close(); err != nil {
		return n, fsErr(rel, "write", rel, err)
	}
	return n, nil
}
