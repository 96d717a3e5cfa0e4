package agent

import (
	"archive/tar"
	"bufio"
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
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// PutArchive extracts a tar stream under a directory. Entries that would
// land outside it — by name or through a symlink — are refused.
func (s *Server) PutArchive(stream grpc.ClientStreamingServer[agentpb.PutArchiveRequest, agentpb.PutArchiveResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hdr := first.GetHeader()
	if hdr == nil {
		return status.Error(codes.InvalidArgument, "the first PutArchive message must be the header")
	}
	dir, err := cleanPath(hdr.GetDir())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fsError("create directory", dir, err)
	}
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fsError("resolve", dir, err)
	}
	if fi, err := os.Stat(root); err != nil || !fi.IsDir() {
		return status.Errorf(codes.FailedPrecondition, "%s is not a directory", dir)
	}
	in := &recvReader{recv: func() ([]byte, error) {
		req, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if req.GetHeader() != nil {
			return nil, status.Error(codes.InvalidArgument, "PutArchive got a second header")
		}
		return req.GetData(), nil
	}}
	x := &extractor{root: root, dir: dir}
	if err := x.extractAll(in); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, in) // trailing padding
	return stream.SendAndClose(&agentpb.PutArchiveResponse{Entries: x.entries, Bytes: x.bytes})
}

// extractAll extracts every entry of the tar stream r.
func (x *extractor) extractAll(r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if _, ok := status.FromError(err); ok {
				return err
			}
			return status.Errorf(codes.InvalidArgument, "bad tar stream after %d entries: %v", x.entries, err)
		}
		if err := x.extract(h, tr); err != nil {
			return err
		}
	}
	return x.finish()
}

// recvReader turns a stream of data messages into an io.Reader.
type recvReader struct {
	recv func() ([]byte, error)
	buf  []byte
}

func (r *recvReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		b, err := r.recv()
		if err != nil {
			return 0, err
		}
		r.buf = b
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

type dirMeta struct {
	path  string
	mode  uint32
	mtime time.Time
}

type extractor struct {
	root    string // dir with symlinks resolved
	dir     string // as the host named it, for messages
	entries int64
	bytes   int64
	dirs    []dirMeta
}

func (x *extractor) refuse(name, why string) error {
	return status.Errorf(codes.InvalidArgument, "refusing archive entry %q: %s %s", name, why, x.dir)
}

// entryRel returns the cleaned slash path of a tar name relative to root.
func (x *extractor) entryRel(name string) (string, error) {
	rel := path.Clean("/" + name) // a leading "/" is stripped, like tar does
	rel = strings.TrimPrefix(rel, "/")
	if strings.Contains(name, "\x00") {
		return "", x.refuse(name, "name contains a NUL byte; extracting into")
	}
	// path.Clean("/"+name) cannot climb above "/": compare with a plain clean.
	if c := path.Clean(name); c == ".." || strings.HasPrefix(c, "../") || strings.Contains(c, "/../") {
		return "", x.refuse(name, "it escapes")
	}
	if rel == "" {
		rel = "."
	}
	return rel, nil
}

// resolveDir resolves a relative directory path under root, following
// symlinks only while they stay inside root. Missing components are kept as
// they are (they will be created).
func (x *extractor) resolveDir(name, rel string, depth int) (string, error) {
	if depth > 40 {
		return "", x.refuse(name, "too many levels of symlinks under")
	}
	cur := x.root
	if rel == "." || rel == "" {
		return cur, nil
	}
	for _, part := range strings.Split(rel, "/") {
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(next)
		if errors.Is(err, fs.ErrNotExist) {
			cur = next
			continue
		}
		if err != nil {
			return "", fsError("stat", next, err)
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", fsError("readlink", next, err)
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(cur, target)
		}
		target = filepath.Clean(target)
		if !within(x.root, target) {
			return "", x.refuse(name, fmt.Sprintf("it goes through symlink %s -> %s, outside", next, target))
		}
		r, _ := filepath.Rel(x.root, target)
		if cur, err = x.resolveDir(name, filepath.ToSlash(r), depth+1); err != nil {
			return "", err
		}
	}
	return cur, nil
}

func within(root, p string) bool {
	return p == root || strings.HasPrefix(p, strings.TrimSuffix(root, "/")+"/")
}

// extract writes one entry without ever following a symlink at its final
// component.
func (x *extractor) extract(h *tar.Header, r io.Reader) error {
	rel, err := x.entryRel(h.Name)
	if err != nil {
		return err
	}
	if rel == "." {
		return nil // the target directory itself keeps its mode
	}
	parent, err := x.resolveDir(h.Name, path.Dir(rel), 0)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fsError("create directory", parent, err)
	}
	target := filepath.Join(parent, path.Base(rel))
	mode := uint32(h.Mode) & 0o7777
	existing, lerr := os.Lstat(target)
	exists := lerr == nil
	// replace removes a non-directory in the way (a symlink is removed, not
	// followed).
	replace := func() error {
		if !exists {
			return nil
		}
		if existing.IsDir() {
			return status.Errorf(codes.FailedPrecondition, "archive entry %q: %s is a directory", h.Name, target)
		}
		if err := os.Remove(target); err != nil {
			return fsError("replace", target, err)
		}
		return nil
	}

	switch h.Typeflag {
	case tar.TypeDir:
		if exists && !existing.IsDir() {
			if err := os.Remove(target); err != nil {
				return fsError("replace", target, err)
			}
			exists = false
		}
		if !exists {
			if err := unix.Mkdirat(unix.AT_FDCWD, target, 0o700); err != nil {
				return fsError("mkdir", target, err)
			}
		}
		x.dirs = append(x.dirs, dirMeta{target, mode, h.ModTime})
	case tar.TypeReg:
		if err := replace(); err != nil {
			return err
		}
		f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return fsError("create", target, err)
		}
		n, err := io.Copy(f, r)
		x.bytes += n
		if err != nil {
			f.Close()
			if _, ok := status.FromError(err); ok {
				return err
			}
			return status.Errorf(codes.InvalidArgument, "archive entry %q: %v", h.Name, err)
		}
		if err := unix.Fchmod(int(f.Fd()), mode); err != nil {
			f.Close()
			return fsError("chmod", target, err)
		}
		if err := f.Close(); err != nil {
			return fsError("close", target, err)
		}
		setMtime(target, h.ModTime)
	case tar.TypeSymlink:
		if err := replace(); err != nil {
			return err
		}
		if err := os.Symlink(h.Linkname, target); err != nil {
			return fsError("symlink", target, err)
		}
		setMtime(target, h.ModTime)
	case tar.TypeLink:
		lrel, err := x.entryRel(h.Linkname)
		if err != nil || lrel == "." {
			return x.refuse(h.Name, "hard link target "+h.Linkname+" is outside")
		}
		lparent, err := x.resolveDir(h.Name, path.Dir(lrel), 0)
		if err != nil {
			return err
		}
		src := filepath.Join(lparent, path.Base(lrel))
		if fi, err := os.Lstat(src); err != nil || fi.IsDir() {
			return status.Errorf(codes.InvalidArgument, "archive entry %q: hard link target %q is missing or a directory", h.Name, h.Linkname)
		}
		if err := replace(); err != nil {
			return err
		}
		if err := os.Link(src, target); err != nil {
			return fsError("link", target, err)
		}
	default:
		return nil // devices, FIFOs and the like are skipped
	}
	x.entries++
	return nil
}

// finish applies directory modes and mtimes, deepest first, once their
// contents are written.
func (x *extractor) finish() error {
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		if err := unix.Fchmodat(unix.AT_FDCWD, d.path, d.mode, 0); err != nil {
			return fsError("chmod", d.path, err)
		}
		setMtime(d.path, d.mtime)
	}
	return nil
}

// setMtime sets access and modification time without following symlinks.
func setMtime(p string, t time.Time) {
	if t.IsZero() {
		return
	}
	ts := unix.NsecToTimespec(t.UnixNano())
	_ = unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
}

// GetArchive streams a file or directory tree as tar. Names start with the
// base name of the path (like docker cp); symlinks are stored, not followed.
func (s *Server) GetArchive(req *agentpb.GetArchiveRequest, stream grpc.ServerStreamingServer[agentpb.DataChunk]) error {
	p, err := cleanPath(req.GetPath())
	if err != nil {
		return err
	}
	fi, err := os.Lstat(p)
	if err != nil {
		return fsError("stat", p, err)
	}
	bw := bufio.NewWriterSize(sendWriter(func(b []byte) error {
		return stream.Send(&agentpb.DataChunk{Data: b})
	}), fileChunk)
	tw := tar.NewWriter(bw)
	prefix := filepath.Base(p)
	if p == "/" {
		prefix = "."
	}
	if !fi.IsDir() {
		err = addTarEntry(tw, p, prefix, fi)
	} else {
		err = filepath.WalkDir(p, func(fp string, d fs.DirEntry, werr error) error {
			if werr != nil {
				if errors.Is(werr, fs.ErrNotExist) && fp != p {
					return nil // vanished while walking
				}
				return werr
			}
			info, err := d.Info()
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(p, fp)
			return addTarEntry(tw, fp, path.Join(prefix, filepath.ToSlash(rel)), info)
		})
	}
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		return fsError("archive", p, err)
	}
	if err := tw.Close(); err != nil {
		return fsError("archive", p, err)
	}
	return bw.Flush()
}

func addTarEntry(tw *tar.Writer, fp, name string, fi fs.FileInfo) error {
	var link string
	if fi.Mode()&fs.ModeSymlink != 0 {
		l, err := os.Readlink(fp)
		if err != nil {
			return err
		}
		link = l
	}
	if fi.Mode()&fs.ModeSocket != 0 {
		return nil // tar cannot hold sockets
	}
	h, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return nil // an unsupported file type is skipped
	}
	h.Name = name
	if fi.IsDir() {
		h.Name += "/"
	}
	h.Format = tar.FormatPAX // keep nanosecond mtimes (USTAR rounds to seconds)
	if !fi.Mode().IsRegular() {
		return tw.WriteHeader(h)
	}
	f, err := os.OpenFile(fp, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	n, err := io.CopyN(tw, f, h.Size)
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%s shrank while being archived (%d of %d bytes)", fp, n, h.Size)
	}
	return err
}

// sendWriter sends each write as one or more chunks of at most fileChunk.
type sendWriter func([]byte) error

func (w sendWriter) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		n := min(len(p), fileChunk)
		if err := w(p[:n]); err != nil {
			return total - len(p), err
		}
		p = p[n:]
	}
	return total, nil
}
