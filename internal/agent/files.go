package agent

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

const fileChunk = 64 << 10

// WriteFile writes one regular file atomically: a temp file in the target's
// directory, fsync, then rename over the target.
func (s *Server) WriteFile(stream grpc.ClientStreamingServer[agentpb.WriteFileRequest, agentpb.WriteFileResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hdr := first.GetHeader()
	if hdr == nil {
		return status.Error(codes.InvalidArgument, "the first WriteFile message must be the header")
	}
	p, err := cleanPath(hdr.GetPath())
	if err != nil {
		return err
	}
	if p == "/" {
		return status.Error(codes.InvalidArgument, "cannot write a file at /")
	}
	mode := hdr.GetMode() & 0o7777
	if hdr.GetMode() == 0 {
		mode = 0o644
	}
	dir := filepath.Dir(p)
	if hdr.GetMakeParents() {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fsError("create parent directories of", p, err)
		}
	} else if fi, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return status.Errorf(codes.NotFound, "parent directory %s does not exist (set make_parents to create it)", dir)
		}
		return fsError("stat", dir, err)
	} else if !fi.IsDir() {
		return status.Errorf(codes.FailedPrecondition, "parent %s is not a directory", dir)
	}
	if fi, err := os.Lstat(p); err == nil && fi.IsDir() {
		return status.Errorf(codes.FailedPrecondition, "%s is a directory", p)
	}

	f, err := os.CreateTemp(dir, ".smolvm-tmp-*")
	if err != nil {
		return fsError("create temp file in", dir, err)
	}
	tmp := f.Name()
	committed := false
	defer func() {
		if !committed {
			f.Close()
			os.Remove(tmp)
		}
	}()
	var size int64
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		data := req.GetData()
		if req.GetHeader() != nil {
			return status.Error(codes.InvalidArgument, "WriteFile got a second header")
		}
		n, err := f.Write(data)
		size += int64(n)
		if err != nil {
			return fsError("write", p, err)
		}
	}
	// Fchmod is exact (no umask) and allows setuid/setgid/sticky bits.
	if err := unix.Fchmod(int(f.Fd()), mode); err != nil {
		return fsError("chmod", p, err)
	}
	if err := f.Sync(); err != nil {
		return fsError("sync", p, err)
	}
	if err := f.Close(); err != nil {
		return fsError("close", p, err)
	}
	if ns := hdr.GetMtimeUnixNs(); ns != 0 {
		t := time.Unix(0, ns)
		if err := os.Chtimes(tmp, t, t); err != nil {
			return fsError("set mtime of", p, err)
		}
	}
	if err := os.Rename(tmp, p); err != nil {
		return fsError("rename into", p, err)
	}
	committed = true
	syncDir(dir)
	return stream.SendAndClose(&agentpb.WriteFileResponse{Size: size})
}

// syncDir makes a rename durable; errors are ignored (best effort).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// ReadFile streams one regular file in 64 KiB chunks.
func (s *Server) ReadFile(req *agentpb.ReadFileRequest, stream grpc.ServerStreamingServer[agentpb.DataChunk]) error {
	p, err := cleanPath(req.GetPath())
	if err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NONBLOCK, 0) // a FIFO must not hang the open
	if err != nil {
		return fsError("open", p, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fsError("stat", p, err)
	}
	if !fi.Mode().IsRegular() {
		return status.Errorf(codes.FailedPrecondition, "%s is not a regular file (%s)", p, fileKind(fi.Mode()))
	}
	if req.GetSparse() {
		return sendSparse(f, p, stream.Send)
	}
	buf := make([]byte, fileChunk)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if serr := stream.Send(&agentpb.DataChunk{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fsError("read", p, err)
		}
	}
}

// sendSparse sends the data of f (at path p) and leaves out its holes:
// each chunk carries its offset, the last message the file's size. A file
// system without SEEK_DATA reports the whole file as data.
func sendSparse(f *os.File, p string, send func(*agentpb.DataChunk) error) error {
	fd := int(f.Fd())
	buf := make([]byte, fileChunk)
	var off int64
	for {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if err != nil {
			return fsError("seek", p, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fsError("seek", p, err)
		}
		for off = data; off < hole; {
			n, err := unix.Pread(fd, buf[:min(int64(len(buf)), hole-off)], off)
			if err != nil {
				return fsError("read", p, err)
			}
			if n == 0 {
				hole = off // the file shrank
				break
			}
			if err := send(&agentpb.DataChunk{Data: buf[:n], Offset: off}); err != nil {
				return err
			}
			off += int64(n)
		}
	}
	end, err := unix.Seek(fd, 0, unix.SEEK_END)
	if err != nil {
		return fsError("seek", p, err)
	}
	return send(&agentpb.DataChunk{Offset: end, Last: true})
}

func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	default:
		return m.Type().String()
	}
}
