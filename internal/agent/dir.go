package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Bounds of one ReadDir answer: it must fit one gRPC message (MaxMessageSize)
// whatever the folder holds.
const (
	maxDirEntries   = 10000
	maxDirPathBytes = 2 << 20
	maxDirDepth     = 64
)

// statResponse describes fi, found at p, as Stat reports it.
func statResponse(p string, fi fs.FileInfo, names *accountNames) *agentpb.StatResponse {
	resp := &agentpb.StatResponse{
		Exists:      true,
		Mode:        uint32(fi.Mode()),
		Size:        fi.Size(),
		MtimeUnixNs: fi.ModTime().UnixNano(),
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		resp.Allocated = st.Blocks * 512
		resp.Uid, resp.Gid = st.Uid, st.Gid
		resp.Owner, resp.Group = names.user(st.Uid), names.group(st.Gid)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		resp.LinkTarget, _ = os.Readlink(p)
	}
	return resp
}

// accountNames maps ids to the guest's account names for one request:
// each file is looked up once, when first asked, through its cache.
type accountNames struct {
	users, groups map[uint32]string
}

func (a *accountNames) user(id uint32) string {
	if a.users == nil {
		a.users = passwdNames.get()
	}
	return a.users[id]
}

func (a *accountNames) group(id uint32) string {
	if a.groups == nil {
		a.groups = groupNames.get()
	}
	return a.groups[id]
}

// idCache keeps the ids → names of an accounts file while the file is
// unchanged (same inode, size and mtime): a Stat or a listing costs one
// stat(2), not a read of /etc/passwd and /etc/group.
type idCache struct {
	path string
	mu   sync.Mutex
	key  [3]int64
	m    map[uint32]string
}

var (
	passwdNames = &idCache{path: "/etc/passwd"}
	groupNames  = &idCache{path: "/etc/group"}
)

// get returns the file's map (shared: never modify it); a missing file
// names nothing.
func (c *idCache) get() map[uint32]string {
	var st unix.Stat_t
	if err := unix.Stat(c.path, &st); err != nil {
		return map[uint32]string{}
	}
	key := [3]int64{int64(st.Ino), st.Size, st.Mtim.Nano()}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || c.key != key {
		c.m, c.key = idNames(c.path), key
	}
	return c.m
}

// idNames reads name:x:id lines; a missing or broken file names nothing.
func idNames(path string) map[uint32]string {
	m := map[uint32]string{}
	rows, err := readAccounts(path)
	if err != nil {
		return m
	}
	for _, f := range rows {
		if len(f) < 3 {
			continue
		}
		if id, err := strconv.ParseUint(f[2], 10, 32); err == nil {
			if _, dup := m[uint32(id)]; !dup {
				m[uint32(id)] = f[0]
			}
		}
	}
	return m
}

// ReadDir lists a directory (and, with depth > 1, its subdirectories)
// without following symlinks, in path order, within the answer's bounds.
func (s *Server) ReadDir(_ context.Context, req *agentpb.ReadDirRequest) (*agentpb.ReadDirResponse, error) {
	root, err := cleanPath(req.GetPath())
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(root) // the listed folder itself may be a symlink to one
	if err != nil {
		return nil, fsError("list", root, err)
	}
	if !fi.IsDir() {
		return nil, status.Errorf(codes.FailedPrecondition, "list %s: not a directory", root)
	}
	depth := int(req.GetDepth())
	if depth < 1 {
		depth = 1
	}
	depth = min(depth, maxDirDepth)
	limit := int(req.GetLimit())
	if limit <= 0 || limit > maxDirEntries {
		limit = maxDirEntries
	}
	l := &lister{limit: limit, names: &accountNames{}}
	if err := l.walk(root, depth); err != nil {
		return nil, err
	}
	return &agentpb.ReadDirResponse{Entries: l.entries, Truncated: l.truncated}, nil
}

type lister struct {
	limit     int
	bytes     int
	names     *accountNames
	entries   []*agentpb.DirEntry
	truncated bool
}

// walk adds dir's entries, each followed by its own when it is a directory
// and depth allows (so the answer is in path order).
func (l *lister) walk(dir string, depth int) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		if len(l.entries) > 0 { // a subfolder that vanished or is unreadable
			return nil
		}
		return fsError("list", dir, err)
	}
	for _, de := range des {
		if len(l.entries) >= l.limit || l.bytes >= maxDirPathBytes {
			l.truncated = true
			return nil
		}
		p := filepath.Join(dir, de.Name())
		fi, err := de.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed while we listed
		}
		if err != nil {
			return fsError("list", p, err)
		}
		l.entries = append(l.entries, &agentpb.DirEntry{Path: p, Stat: statResponse(p, fi, l.names)})
		l.bytes += len(p) + len(fi.Name()) + 64
		if fi.IsDir() && depth > 1 {
			if err := l.walk(p, depth-1); err != nil {
				return err
			}
			if l.truncated {
				return nil
			}
		}
	}
	return nil
}

// MakeDir makes a directory and its missing parents.
func (s *Server) MakeDir(_ context.Context, req *agentpb.MakeDirRequest) (*agentpb.MakeDirResponse, error) {
	p, err := cleanPath(req.GetPath())
	if err != nil {
		return nil, err
	}
	mode := fs.FileMode(req.GetMode()).Perm()
	if mode == 0 {
		mode = 0o755
	}
	if fi, err := os.Stat(p); err == nil {
		if !fi.IsDir() {
			return nil, status.Errorf(codes.FailedPrecondition, "make directory %s: a file of that name exists", p)
		}
		return &agentpb.MakeDirResponse{Created: false}, nil
	}
	if err := os.MkdirAll(p, mode); err != nil {
		return nil, fsError("make directory", p, err)
	}
	return &agentpb.MakeDirResponse{Created: true}, nil
}

// Rename moves a path as rename(2) does.
func (s *Server) Rename(_ context.Context, req *agentpb.RenameRequest) (*agentpb.RenameResponse, error) {
	from, err := cleanPath(req.GetFrom())
	if err != nil {
		return nil, err
	}
	to, err := cleanPath(req.GetTo())
	if err != nil {
		return nil, err
	}
	if err := os.Rename(from, to); err != nil {
		if errors.Is(err, unix.EXDEV) {
			return nil, status.Errorf(codes.FailedPrecondition, "rename %s to %s: they are on different file systems", from, to)
		}
		return nil, fsError("rename", from, err)
	}
	return &agentpb.RenameResponse{}, nil
}

// Remove deletes a path and, for a directory, everything under it.
func (s *Server) Remove(_ context.Context, req *agentpb.RemoveRequest) (*agentpb.RemoveResponse, error) {
	p, err := cleanPath(req.GetPath())
	if err != nil {
		return nil, err
	}
	if p == "/" {
		return nil, status.Error(codes.InvalidArgument, "refusing to remove /")
	}
	if _, err := os.Lstat(p); err != nil {
		return nil, fsError("remove", p, err)
	}
	if err := os.RemoveAll(p); err != nil {
		return nil, fsError("remove", p, err)
	}
	return &agentpb.RemoveResponse{}, nil
}
