package smolvm

import (
	"context"
	"fmt"
	"io/fs"
	"path"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// MaxDirEntries is the most entries one ReadDir or Walk returns.
const MaxDirEntries = 10000

// ReadDir lists a directory in the guest, sorted by name, without following
// symlinks (a symlink to a directory is listed as a symlink; the listed
// directory itself may be one). A directory with more than MaxDirEntries
// entries returns the first of them and an error wrapping ErrInvalid.
func (vm *VM) ReadDir(ctx context.Context, dir string) ([]*FileInfo, error) {
	return vm.Walk(ctx, dir, 1)
}

// Walk lists a directory and its subdirectories down to depth levels (1:
// the directory's own entries, as ReadDir), in path order, each entry with
// its full Path. Like ReadDir it never follows a symlink and returns at most
// MaxDirEntries entries.
func (vm *VM) Walk(ctx context.Context, dir string, depth int) ([]*FileInfo, error) {
	if err := checkGuestPath(dir); err != nil {
		return nil, err
	}
	if depth < 1 {
		return nil, fmt.Errorf("%w: list %s: depth %d must be at least 1", ErrInvalid, dir, depth)
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, err
	}
	r, err := a.ReadDir(ctx, &agentpb.ReadDirRequest{Path: dir, Depth: uint32(min(depth, 1<<16)), Limit: MaxDirEntries})
	if err != nil {
		return nil, vm.callErr(ctx, "list "+dir, fileErr(err))
	}
	entries := r.GetEntries()
	if len(entries) > MaxDirEntries { // never trust the guest's count
		entries, r.Truncated = entries[:MaxDirEntries], true
	}
	out := make([]*FileInfo, 0, len(entries))
	for _, e := range entries {
		p := path.Clean(e.GetPath())
		if !path.IsAbs(p) || e.GetStat() == nil {
			return nil, fmt.Errorf("list %s in VM %s: the guest sent a malformed entry %q", dir, vm.name, e.GetPath())
		}
		out = append(out, fileInfo(p, e.GetStat()))
	}
	if r.GetTruncated() {
		return out, fmt.Errorf("%w: %s in VM %s has more than %d entries (the most one listing returns): list its subdirectories instead",
			ErrInvalid, dir, vm.name, MaxDirEntries)
	}
	return out, nil
}

// MkdirAll makes a directory in the guest with its missing parents (mode
// 0 means 0755), as root. created is false when the directory was already
// there; a file of that name is an error.
func (vm *VM) MkdirAll(ctx context.Context, dir string, mode fs.FileMode) (created bool, err error) {
	if err := checkGuestPath(dir); err != nil {
		return false, err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return false, err
	}
	r, err := a.MakeDir(ctx, &agentpb.MakeDirRequest{Path: dir, Mode: unixMode(mode)})
	if err != nil {
		return false, vm.callErr(ctx, "make directory "+dir, fileErr(err))
	}
	return r.GetCreated(), nil
}

// Rename moves a file or directory in the guest as rename(2) does: an
// existing target file is replaced; both paths must be on one file system.
func (vm *VM) Rename(ctx context.Context, from, to string) error {
	if err := checkGuestPath(from); err != nil {
		return err
	}
	if err := checkGuestPath(to); err != nil {
		return err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return err
	}
	if _, err := a.Rename(ctx, &agentpb.RenameRequest{From: from, To: to}); err != nil {
		return vm.callErr(ctx, "rename "+from, fileErr(err))
	}
	return nil
}

// Remove deletes a path in the guest: a file, a symlink (not its target)
// or a directory with everything under it. A missing path is an error that
// wraps fs.ErrNotExist.
func (vm *VM) Remove(ctx context.Context, guestPath string) error {
	if err := checkGuestPath(guestPath); err != nil {
		return err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return err
	}
	if _, err := a.Remove(ctx, &agentpb.RemoveRequest{Path: guestPath}); err != nil {
		return vm.callErr(ctx, "remove "+guestPath, fileErr(err))
	}
	return nil
}
