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

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/tarx"
)

// PutArchive extracts a tar stream under a directory. Entries that would
// land outside it — by name or through a symlink — are refused.
func (s *Server) PutArchive(stream grpc.ClientStreamingServer[agentpb.PutArchiveRequest, agentpb.PutArchiveResponse]) (err error) {
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
	if hdr.GetFresh() {
		// A staging folder is this call's own: it goes again whenever the
		// call fails, here and not by the caller, which cannot know when a
		// call it abandoned has stopped writing.
		if err := os.Mkdir(dir, 0o700); err != nil {
			return fsError("create directory", dir, err)
		}
		defer func() {
			if err != nil {
				_ = os.RemoveAll(dir)
			}
		}()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fsError("create directory", dir, err)
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
	st, err := extractInto(in, dir)
	if err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, in); err != nil {
		return err // trailing padding; a caller that went did not finish
	}
	return stream.SendAndClose(&agentpb.PutArchiveResponse{Entries: st.Entries, Bytes: st.Bytes})
}

// extractInto extracts the tar stream r under the directory dir with
// tarx's rules for a caller's archive: a leading "/" is taken relative to
// dir, as tar does; a symlink on the way is followed while it stays inside
// dir; setuid and setgid bits are kept (the guest's root asked for them);
// sparse entries are written out.
func extractInto(r io.Reader, dir string) (tarx.Stats, error) {
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return tarx.Stats{}, fsError("resolve", dir, err)
	}
	if fi, err := os.Stat(resolved); err != nil || !fi.IsDir() {
		return tarx.Stats{}, status.Errorf(codes.FailedPrecondition, "%s is not a directory", dir)
	}
	root, err := os.OpenRoot(resolved)
	if err != nil {
		return tarx.Stats{}, fsError("open", dir, err)
	}
	defer root.Close()
	st, err := tarx.Extract(r, root, tarx.Options{
		StripSlash: true, FollowLinks: true, RootPath: resolved, KeepSetID: true, AllowSparse: true,
		PassThrough: func(err error) bool { _, ok := status.FromError(err); return ok },
	})
	var e *tarx.Error
	if !errors.As(err, &e) {
		return st, err
	}
	full := filepath.Join(dir, filepath.FromSlash(e.Path))
	switch e.Kind {
	case tarx.Refused:
		return st, status.Errorf(codes.InvalidArgument, "refusing archive entry %q: %s (extracting into %s)", e.Name, e.Why, dir)
	case tarx.Conflict:
		return st, status.Errorf(codes.FailedPrecondition, "archive entry %q: %s is a directory", e.Name, full)
	case tarx.BadStream:
		return st, status.Errorf(codes.InvalidArgument, "bad tar stream after %d entries: %v", e.Entries, e.Err)
	}
	return st, fsError(e.Op, full, e.Err)
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
