package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrLinkOnPath is OpenTree's error when a component of the path is a
// symbolic link: the path was checked with its links resolved, so a
// link there now means it changed since (or it was never resolved).
var ErrLinkOnPath = errors.New("a symbolic link is on its path")

// OpenTree opens folder p, an absolute path without symbolic links,
// beneath folder within ("" for /), following no symbolic link on the
// way (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS), and returns a
// detached copy of its mount (open_tree OPEN_TREE_CLONE, not recursive)
// with the folder's status. A Bind with that Tree mounts exactly the
// folder opened here, whatever happens to p afterwards: a folder that a
// check resolved, then swapped for a link to elsewhere, is refused here
// (ErrLinkOnPath), and a swap after this call changes nothing. The
// caller closes tree.
func OpenTree(within, p string) (tree *os.File, st unix.Stat_t, err error) {
	if within == "" {
		within = "/"
	}
	if !filepath.IsAbs(within) || !filepath.IsAbs(p) {
		return nil, st, fmt.Errorf("jail: open %s beneath %s: not absolute paths", p, within)
	}
	rel, err := filepath.Rel(within, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil, st, fmt.Errorf("jail: %s is not beneath %s", p, within)
	}
	// Not O_NOFOLLOW: with O_PATH it would open a link at the end
	// instead of refusing it.
	const flags = unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC
	root, err := openat2(unix.AT_FDCWD, within, &unix.OpenHow{Flags: flags,
		Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return nil, st, fmt.Errorf("jail: open %s: %w", within, err)
	}
	defer unix.Close(root)
	fd, err := openat2(root, rel, &unix.OpenHow{Flags: flags,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return nil, st, fmt.Errorf("jail: open %s beneath %s: %w", p, within, err)
	}
	defer unix.Close(fd)
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, st, fmt.Errorf("jail: stat %s: %w", p, err)
	}
	t, err := unix.OpenTree(fd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return nil, st, fmt.Errorf("jail: copy the mount of %s: %w", p, err)
	}
	return os.NewFile(uintptr(t), p), st, nil
}

// openat2 retries what a concurrent rename makes the kernel give up
// (EAGAIN, with RESOLVE_BENEATH) and names a link on the path.
func openat2(dir int, p string, how *unix.OpenHow) (int, error) {
	for range 16 {
		fd, err := unix.Openat2(dir, p, how)
		switch {
		case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ELOOP):
			return -1, ErrLinkOnPath
		case errors.Is(err, unix.EXDEV):
			return -1, fmt.Errorf("it leads out of the folder: %w", err)
		case errors.Is(err, unix.ENOSYS):
			return -1, fmt.Errorf("openat2 needs Linux 5.6 or later: %w", err)
		}
		return fd, err
	}
	return -1, fmt.Errorf("renamed too often while it was opened: %w", unix.EAGAIN)
}

// bindTree mounts b.Tree (OpenTree) at dst.
func bindTree(b Bind, dst string) error {
	if err := unix.MoveMount(int(b.Tree.Fd()), "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("jail: bind %s: %w", b.Source, err)
	}
	// A copy of a shared mount is its peer: events below it would
	// propagate between the jail and the host.
	if err := unix.Mount("", dst, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("jail: bind %s: make it private: %w", b.Source, err)
	}
	return nil
}
