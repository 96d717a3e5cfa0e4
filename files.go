package smolvm

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/tarx"
)

// MaxReadFileSize is the largest file ReadFile returns. Stream bigger
// files with CopyFrom or Download.
const MaxReadFileSize = 256 << 20

// ErrFileTooLarge is returned by ReadFile for a file over MaxReadFileSize.
var ErrFileTooLarge = errors.New("file too large")

// fileChunk is the size of the data messages sent to the guest. Memory
// in flight is bounded by it and by the transport's flow-control windows.
const fileChunk = 256 << 10

// FileInfo describes a path in the guest. It implements fs.FileInfo.
type FileInfo struct {
	name  string
	size  int64
	mode  fs.FileMode
	mtime time.Time
	link  string
	// allocated is what the file takes on the guest's disk, as the
	// guest reports it.
	allocated int64
	path      string
	uid, gid  int
	owner     string
	group     string
}

// fileInfo builds a FileInfo from the agent's lstat of guestPath.
func fileInfo(guestPath string, r *agentpb.StatResponse) *FileInfo {
	return &FileInfo{name: path.Base(guestPath), path: guestPath, size: r.Size, mode: fs.FileMode(r.Mode),
		mtime: time.Unix(0, r.MtimeUnixNs), link: r.LinkTarget, allocated: r.Allocated,
		uid: int(r.Uid), gid: int(r.Gid), owner: r.Owner, group: r.Group}
}

func (fi *FileInfo) Name() string       { return fi.name }
func (fi *FileInfo) Size() int64        { return fi.size }
func (fi *FileInfo) Mode() fs.FileMode  { return fi.mode }
func (fi *FileInfo) ModTime() time.Time { return fi.mtime }
func (fi *FileInfo) IsDir() bool        { return fi.mode.IsDir() }
func (fi *FileInfo) Sys() any           { return nil }

// LinkTarget is the target of a symlink ("" for anything else).
func (fi *FileInfo) LinkTarget() string { return fi.link }

// Path is the file's absolute path in the guest.
func (fi *FileInfo) Path() string { return fi.path }

// Owner is the file's owner in the guest: its uid and gid, and their names
// in the guest's /etc/passwd and /etc/group ("" when they have none).
func (fi *FileInfo) Owner() (uid, gid int, user, group string) {
	return fi.uid, fi.gid, fi.owner, fi.group
}

// guestError is a file error reported by the guest agent. It unwraps to
// fs.ErrNotExist (and ErrNotFound), fs.ErrPermission or ErrInvalid where
// that fits, so that callers can test it with errors.Is.
type guestError struct {
	msg   string
	kinds []error
}

func (e *guestError) Error() string   { return e.msg }
func (e *guestError) Unwrap() []error { return e.kinds }

// fileErr turns a gRPC status from the agent into a guestError: the
// sentinel of its code (errdefs), and the file system's view of it.
func fileErr(err error) error {
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	var kinds []error
	k := errdefs.Kind(errdefs.FromGRPC(err))
	if k != nil && s.Code() == codes.FailedPrecondition {
		return errdefs.FromGRPC(err) // the supervisor's (a paused VM), not the guest's
	}
	if k != nil {
		kinds = append(kinds, k)
	}
	switch s.Code() {
	case codes.NotFound:
		kinds = append(kinds, fs.ErrNotExist)
	case codes.PermissionDenied:
		kinds = append(kinds, fs.ErrPermission)
	case codes.FailedPrecondition: // the agent's "is a directory", "not a directory"
		kinds = append(kinds, ErrInvalid)
	case codes.InvalidArgument, codes.ResourceExhausted, codes.Internal:
	default:
		return err // transport errors, cancellation: callErr explains them
	}
	return &guestError{msg: s.Message(), kinds: kinds}
}

// checkGuestPath refuses a guest path that is empty, relative or has a NUL.
func checkGuestPath(p string) error {
	if p == "" || !path.IsAbs(p) || strings.ContainsRune(p, 0) {
		return fmt.Errorf("%w: guest path %q must be absolute (start with /)", ErrInvalid, p)
	}
	return nil
}

// Stat describes a path in the guest without following a final symlink. A
// missing path is an error that wraps fs.ErrNotExist.
func (vm *VM) Stat(ctx context.Context, guestPath string) (*FileInfo, error) {
	if err := checkGuestPath(guestPath); err != nil {
		return nil, err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, err
	}
	r, err := a.Stat(ctx, &agentpb.StatRequest{Path: guestPath})
	if err != nil {
		return nil, vm.callErr(ctx, "stat "+guestPath, fileErr(err))
	}
	if !r.Exists {
		return nil, fmt.Errorf("stat %s in VM %s: %w", guestPath, vm.name, unix.ENOENT)
	}
	return fileInfo(guestPath, r), nil
}

// statOrNil is Stat with a missing path reported as nil, nil.
func (vm *VM) statOrNil(ctx context.Context, guestPath string) (*FileInfo, error) {
	fi, err := vm.Stat(ctx, guestPath)
	if errors.Is(err, fs.ErrNotExist) && !isGuestErr(err) {
		return nil, nil
	}
	return fi, err
}

func isGuestErr(err error) bool {
	var ge *guestError
	return errors.As(err, &ge)
}

// unixMode converts fs.FileMode permission and special bits to Unix bits.
func unixMode(m fs.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		u |= unix.S_ISUID
	}
	if m&fs.ModeSetgid != 0 {
		u |= unix.S_ISGID
	}
	if m&fs.ModeSticky != 0 {
		u |= unix.S_ISVTX
	}
	return u
}

// WriteFile writes data to a file in the guest atomically (a temp file
// renamed over the target), creating missing parent directories. A zero
// mode means 0644.
func (vm *VM) WriteFile(ctx context.Context, guestPath string, data []byte, mode fs.FileMode) error {
	_, err := vm.CopyTo(ctx, bytes.NewReader(data), guestPath, mode)
	return err
}

// CopyTo streams r into a file in the guest, like WriteFile, and returns
// the number of bytes written. Memory use does not grow with the size of
// the file.
func (vm *VM) CopyTo(ctx context.Context, r io.Reader, guestPath string, mode fs.FileMode) (int64, error) {
	if err := checkGuestPath(guestPath); err != nil {
		return 0, err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return 0, err
	}
	what := "write " + guestPath
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := a.WriteFile(cctx)
	if err != nil {
		return 0, vm.callErr(ctx, what, fileErr(err))
	}
	hdr := &agentpb.WriteFileHeader{Path: guestPath, Mode: unixMode(mode), MakeParents: true}
	remoteErr := func() error {
		_, err := stream.CloseAndRecv()
		if err == nil {
			err = errors.New("the agent ended the transfer early")
		}
		return vm.callErr(ctx, what, fileErr(err))
	}
	if err := stream.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Header{Header: hdr}}); err != nil {
		return 0, remoteErr()
	}
	var sent int64
	for {
		buf := make([]byte, fileChunk) // not reused: gRPC may keep a sent message
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if err := stream.Send(&agentpb.WriteFileRequest{Msg: &agentpb.WriteFileRequest_Data{Data: buf[:n]}}); err != nil {
				return sent, remoteErr()
			}
			sent += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			// Cancelling the call makes the guest drop its temp file.
			return sent, fmt.Errorf("%s in VM %s: read the source: %w", what, vm.name, rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return sent, vm.callErr(ctx, what, fileErr(err))
	}
	return resp.Size, nil
}

// ReadFile returns the contents of a regular file in the guest. Files over
// MaxReadFileSize are refused with ErrFileTooLarge: stream them with
// CopyFrom or Download.
func (vm *VM) ReadFile(ctx context.Context, guestPath string) ([]byte, error) {
	fi, err := vm.Stat(ctx, guestPath)
	if err != nil {
		return nil, err
	}
	if fi.Size() > MaxReadFileSize {
		return nil, vm.tooLarge(guestPath, fi.Size())
	}
	var buf bytes.Buffer
	if fi.Mode().IsRegular() {
		buf.Grow(int(fi.Size()))
	}
	if _, err := vm.readFile(ctx, guestPath, &buf, MaxReadFileSize); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (vm *VM) tooLarge(guestPath string, size int64) error {
	what := "more than"
	if size > 0 {
		what = fmt.Sprintf("%d bytes,", size)
	}
	return fmt.Errorf("read %s in VM %s: %w: %s over the %d MiB limit of ReadFile: use CopyFrom or Download to stream it",
		guestPath, vm.name, ErrFileTooLarge, what, MaxReadFileSize>>20)
}

// CopyFrom streams a regular file of the guest into w and returns the
// number of bytes copied.
func (vm *VM) CopyFrom(ctx context.Context, guestPath string, w io.Writer) (int64, error) {
	return vm.readFile(ctx, guestPath, w, -1)
}

func (vm *VM) readFile(ctx context.Context, guestPath string, w io.Writer, limit int64) (int64, error) {
	if err := checkGuestPath(guestPath); err != nil {
		return 0, err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return 0, err
	}
	what := "read " + guestPath
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := a.ReadFile(cctx, &agentpb.ReadFileRequest{Path: guestPath})
	if err != nil {
		return 0, vm.callErr(ctx, what, fileErr(err))
	}
	var n int64
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, vm.callErr(ctx, what, fileErr(err))
		}
		if limit >= 0 && n+int64(len(chunk.Data)) > limit {
			return n, vm.tooLarge(guestPath, 0)
		}
		m, err := w.Write(chunk.Data)
		n += int64(m)
		if err != nil {
			return n, fmt.Errorf("%s in VM %s: write the copy: %w", what, vm.name, err)
		}
	}
}

// GetArchive streams a guest path (file or directory tree) to w as a tar
// stream whose names start with the path's base name, like 'docker cp
// VM:path -'. Symlinks are stored as symlinks. It returns the bytes written.
func (vm *VM) GetArchive(ctx context.Context, guestPath string, w io.Writer) (int64, error) {
	if err := checkGuestPath(guestPath); err != nil {
		return 0, err
	}
	r, cancel, err := vm.archiveReader(ctx, guestPath)
	if err != nil {
		return 0, err
	}
	defer cancel()
	n, err := io.Copy(w, r)
	if err != nil {
		var ce *callError
		if errors.As(err, &ce) {
			return n, ce.err
		}
		return n, fmt.Errorf("archive %s in VM %s: write the archive: %w", guestPath, vm.name, err)
	}
	return n, nil
}

// callError marks an error already explained by callErr, so that it is
// not wrapped twice.
type callError struct{ err error }

func (e *callError) Error() string { return e.err.Error() }
func (e *callError) Unwrap() error { return e.err }

func unwrapCallErr(err error) error {
	var ce *callError
	if errors.As(err, &ce) {
		return ce.err
	}
	return err
}

// archiveReader starts GetArchive and returns the tar stream as a reader.
func (vm *VM) archiveReader(ctx context.Context, guestPath string) (io.Reader, context.CancelFunc, error) {
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, nil, err
	}
	cctx, cancel := context.WithCancel(ctx)
	stream, err := a.GetArchive(cctx, &agentpb.GetArchiveRequest{Path: guestPath})
	if err != nil {
		cancel()
		return nil, nil, vm.callErr(ctx, "archive "+guestPath, fileErr(err))
	}
	return &recvReader{recv: func() ([]byte, error) {
		c, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		if err != nil {
			return nil, &callError{vm.callErr(ctx, "archive "+guestPath, fileErr(err))}
		}
		return c.Data, nil
	}}, cancel, nil
}

// recvReader turns a stream of data messages into an io.Reader.
type recvReader struct {
	recv func() ([]byte, error)
	buf  []byte
	err  error
}

func (r *recvReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.buf, r.err = r.recv()
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// PutArchive extracts a tar stream into a guest directory (created when
// missing), like 'docker cp - VM:dir'. The guest refuses entries that would
// land outside the directory, by name or through a symlink.
func (vm *VM) PutArchive(ctx context.Context, guestDir string, tarStream io.Reader) error {
	return vm.putArchive(ctx, guestDir, false, copyFrom(tarStream))
}

func copyFrom(r io.Reader) func(io.Writer) error {
	return func(w io.Writer) error {
		_, err := io.Copy(w, r)
		return err
	}
}

// PutArchiveStaged is PutArchive for a guest directory that exists, all or
// nothing: the archive is extracted into a staging folder beside the
// directory's entries, and its entries are moved into place (merging
// folders that exist in both, as extracting there would have) only once
// the whole stream arrived and extracted. A stream that fails or is cut
// off, or a bad archive, leaves nothing behind, even when ctx ends first.
func (vm *VM) PutArchiveStaged(ctx context.Context, guestDir string, tarStream io.Reader) error {
	fi, err := vm.Stat(ctx, guestDir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w: %s in VM %s is not a directory: give the directory to extract into", ErrInvalid, guestDir, vm.name)
	}
	staging := path.Join(path.Clean(guestDir), ".smolvm-upload-"+rand.Text())
	if err := vm.putArchive(ctx, staging, true, copyFrom(tarStream)); err != nil {
		return err // the guest removed the staging folder
	}
	// Moving in is a few renames; a failure halfway still removes what is
	// left of the staging folder, even when ctx ended.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	err = vm.moveInto(ctx, staging, guestDir, 0)
	if rerr := vm.Remove(cctx, staging); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}

// moveInto moves the entries of from into to, merging folders that exist
// in both.
func (vm *VM) moveInto(ctx context.Context, from, to string, depth int) error {
	if depth > 64 {
		return fmt.Errorf("%w: the archive nests folders deeper than 64 levels over existing ones", ErrInvalid)
	}
	ents, err := vm.ReadDir(ctx, from)
	if err != nil {
		return err
	}
	for _, e := range ents {
		src, dst := path.Join(from, e.Name()), path.Join(to, e.Name())
		if e.IsDir() {
			if fi, err := vm.Stat(ctx, dst); err == nil && fi.IsDir() {
				if err := vm.moveInto(ctx, src, dst, depth+1); err != nil {
					return err
				}
				continue
			}
		}
		if err := vm.Rename(ctx, src, dst); err != nil {
			return err
		}
	}
	return nil
}

// errRemoteClosed is returned by chunkSender when the guest ended the call;
// its status tells why.
var errRemoteClosed = errors.New("the guest ended the transfer")

// chunkSender sends each write as data messages of at most fileChunk.
type chunkSender func([]byte) error

func (s chunkSender) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		n := min(len(p), fileChunk)
		if err := s(append([]byte(nil), p[:n]...)); err != nil {
			return total - len(p), err
		}
		p = p[n:]
	}
	return total, nil
}

func (vm *VM) putArchive(ctx context.Context, guestDir string, fresh bool, write func(io.Writer) error) error {
	if err := checkGuestPath(guestDir); err != nil {
		return err
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return err
	}
	what := "extract into " + guestDir
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := a.PutArchive(cctx)
	if err != nil {
		return vm.callErr(ctx, what, fileErr(err))
	}
	send := func(m *agentpb.PutArchiveRequest) error {
		if err := stream.Send(m); err != nil {
			return errRemoteClosed
		}
		return nil
	}
	werr := send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Header{Header: &agentpb.PutArchiveHeader{Dir: guestDir, Fresh: fresh}}})
	if werr == nil {
		bw := bufio.NewWriterSize(chunkSender(func(b []byte) error {
			return send(&agentpb.PutArchiveRequest{Msg: &agentpb.PutArchiveRequest_Data{Data: b}})
		}), fileChunk)
		werr = write(bw)
		if werr == nil {
			werr = bw.Flush()
		}
	}
	if werr != nil && !errors.Is(werr, errRemoteClosed) {
		return fmt.Errorf("%s in VM %s: %w", what, vm.name, werr)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		return vm.callErr(ctx, what, fileErr(err))
	}
	if werr != nil {
		return fmt.Errorf("%s in VM %s: %w", what, vm.name, werr)
	}
	return nil
}

// copyPlan is where a copy lands: entries are named name/... under dir.
// name "." copies the contents of a source directory into dir.
type copyPlan struct {
	dir  string
	name string
}

// planCopy applies the rules of 'docker cp' to a source (its base name,
// whether it is a directory, whether it was named with a trailing "/.")
// and a destination (whether it exists, is a directory, was named with a
// trailing slash). join, dirOf and base work on the destination's kind of
// path.
func planCopy(srcBase string, srcIsDir, contentsOnly bool, dst string, dstExists, dstIsDir, dstSlash bool,
	dirOf, base func(string) string) (copyPlan, error) {
	switch {
	case dstExists && dstIsDir:
		if srcIsDir && contentsOnly {
			return copyPlan{dir: dst, name: "."}, nil
		}
		return copyPlan{dir: dst, name: srcBase}, nil
	case dstExists && srcIsDir:
		return copyPlan{}, fmt.Errorf("%w: cannot copy a directory onto %s: it exists and is not a directory", ErrInvalid, dst)
	case !dstExists && dstSlash && !srcIsDir:
		return copyPlan{}, fmt.Errorf("%w: destination directory %s does not exist: create it first, or drop the trailing slash to name the file", fs.ErrNotExist, dst)
	}
	return copyPlan{dir: dirOf(dst), name: base(dst)}, nil
}

// Upload copies a local file or directory tree into the guest, with the
// rules of 'docker cp': into an existing directory the source goes inside
// it; otherwise it is created at guestPath (whose parent must exist). A
// source named with a trailing "/." copies its contents only. Modes and
// mtimes are kept; symlinks are copied as symlinks, never followed. Files
// stream through a tar stream: memory does not grow with their size.
func (vm *VM) Upload(ctx context.Context, localPath, guestPath string) error {
	if err := checkGuestPath(guestPath); err != nil {
		return err
	}
	contentsOnly := localPath == "." || strings.HasSuffix(localPath, "/.")
	src := filepath.Clean(localPath)
	if strings.HasSuffix(localPath, "/") || contentsOnly {
		// A trailing slash names the directory a symlink points to.
		if r, err := filepath.EvalSymlinks(src); err == nil {
			src = r
		}
	}
	sfi, err := os.Lstat(src)
	if err != nil {
		return fmt.Errorf("upload: local path %s: %w", localPath, unwrapPathErr(err))
	}
	dst := path.Clean(guestPath)
	dstSlash := strings.HasSuffix(guestPath, "/") || strings.HasSuffix(guestPath, "/.")
	dfi, err := vm.statOrNil(ctx, dst)
	if err != nil {
		return err
	}
	if dfi != nil && dfi.Mode()&fs.ModeSymlink != 0 {
		// A destination symlink to a directory is used as that directory
		// (the guest resolves it); to anything else it is replaced.
		target := dfi.LinkTarget()
		if !path.IsAbs(target) {
			target = path.Join(path.Dir(dst), target)
		}
		if tfi, err := vm.statOrNil(ctx, target); err == nil && tfi != nil && tfi.IsDir() {
			dfi = tfi
		}
	}
	plan, err := planCopy(filepath.Base(src), sfi.IsDir(), contentsOnly, dst, dfi != nil, dfi != nil && dfi.IsDir(), dstSlash,
		path.Dir, path.Base)
	if err != nil {
		return fmt.Errorf("upload %s to VM %s:%s: %w", localPath, vm.name, guestPath, err)
	}
	if dfi == nil {
		pfi, err := vm.statOrNil(ctx, plan.dir)
		if err != nil {
			return err
		}
		if pfi == nil || !pfi.IsDir() {
			return fmt.Errorf("upload %s to VM %s:%s: %w: parent directory %s does not exist in the VM: create it first (smolvm exec %s -- mkdir -p %s)",
				localPath, vm.name, guestPath, fs.ErrNotExist, plan.dir, vm.name, plan.dir)
		}
	}
	return vm.putArchive(ctx, plan.dir, false, func(w io.Writer) error {
		tw := tar.NewWriter(w)
		if err := writeTree(tw, src, plan.name, sfi); err != nil {
			return err
		}
		return tw.Close()
	})
}

func unwrapPathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// writeTree writes src (a file, symlink or directory tree) to tw with names
// under name. Symlinks are stored, never followed.
func writeTree(tw *tar.Writer, src, name string, fi fs.FileInfo) error {
	if !fi.IsDir() {
		return addLocalEntry(tw, src, name, fi)
	}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("read %s: %w", p, unwrapPathErr(err))
		}
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil // vanished while walking
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		return addLocalEntry(tw, p, path.Join(name, filepath.ToSlash(rel)), info)
	})
}

func addLocalEntry(tw *tar.Writer, p, name string, fi fs.FileInfo) error {
	var link string
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		l, err := os.Readlink(p)
		if err != nil {
			return err
		}
		link = l
	case fi.Mode().IsRegular(), fi.IsDir():
	default:
		return nil // devices, FIFOs and sockets are not copied
	}
	h, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return fmt.Errorf("archive %s: %w", p, err)
	}
	h.Name = name
	if fi.IsDir() {
		h.Name += "/"
	}
	h.Uname, h.Gname, h.Uid, h.Gid = "", "", 0, 0
	h.AccessTime, h.ChangeTime = time.Time{}, time.Time{}
	h.Format = tar.FormatPAX // long names and nanosecond mtimes
	if !fi.Mode().IsRegular() {
		return tw.WriteHeader(h)
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", p, unwrapPathErr(err))
	}
	defer f.Close()
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	n, err := io.CopyN(tw, f, h.Size)
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%s shrank while being copied (%d of %d bytes): copy it again", p, n, h.Size)
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", p, err)
	}
	return nil
}

// Download copies a guest file or directory tree to the host, with the
// rules of 'docker cp' (see Upload). Extraction on the host is as careful
// as in the guest: entries that would land outside the target are refused,
// symlinks are created but never followed while writing, and setuid and
// setgid bits are dropped. A regular file crosses without its holes (the
// guest finds them with SEEK_DATA/SEEK_HOLE) and after a check that the
// local disk has room for it; blocks of zeros in any file become holes.
// Each file is written under a temporary name and renamed when complete;
// a copy that fails leaves no partial file, nor a folder it created. A
// full disk is an error that wraps syscall.ENOSPC and names the folder.
func (vm *VM) Download(ctx context.Context, guestPath, localPath string) (err error) {
	if err := checkGuestPath(guestPath); err != nil {
		return err
	}
	src := path.Clean(guestPath)
	sfi, err := vm.Stat(ctx, src)
	if err != nil {
		return err
	}
	srcIsDir := sfi.IsDir()
	contentsOnly := strings.HasSuffix(guestPath, "/.")
	if sfi.Mode()&fs.ModeSymlink != 0 && (strings.HasSuffix(guestPath, "/") || contentsOnly) {
		// A trailing slash names the directory the link points to: the
		// guest archives the link itself, so resolve it here.
		target := sfi.LinkTarget()
		if !path.IsAbs(target) {
			target = path.Join(path.Dir(src), target)
		}
		if tfi, err := vm.Stat(ctx, target); err == nil && tfi.IsDir() {
			src, sfi, srcIsDir = target, tfi, true
		}
	}
	dst := filepath.Clean(localPath)
	dstSlash := strings.HasSuffix(localPath, "/") || strings.HasSuffix(localPath, "/.")
	dfi, err := os.Stat(dst) // a destination symlink to a directory is that directory
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("download to %s: %w", localPath, err)
	}
	if err != nil {
		dfi = nil
	}
	plan, err := planCopy(path.Base(src), srcIsDir, contentsOnly, dst, dfi != nil, dfi != nil && dfi.IsDir(), dstSlash,
		filepath.Dir, filepath.Base)
	if err != nil {
		return fmt.Errorf("download VM %s:%s to %s: %w", vm.name, guestPath, localPath, err)
	}
	if pfi, err := os.Stat(plan.dir); err != nil || !pfi.IsDir() {
		return fmt.Errorf("download VM %s:%s to %s: %w: local directory %s does not exist: create it first",
			vm.name, guestPath, localPath, fs.ErrNotExist, plan.dir)
	}
	fail := func(err error) error {
		return fmt.Errorf("download VM %s:%s to %s: %w", vm.name, guestPath, localPath, unwrapCallErr(err))
	}
	if sfi.Mode().IsRegular() {
		return vm.downloadFile(ctx, src, sfi, plan.dir, plan.name, fail)
	}
	// A tree that fails half way is removed, unless it was there before.
	if _, lerr := os.Lstat(filepath.Join(plan.dir, plan.name)); errors.Is(lerr, fs.ErrNotExist) && plan.name != "." {
		defer func() {
			if err != nil {
				_ = os.RemoveAll(filepath.Join(plan.dir, plan.name))
			}
		}()
	}
	prefix := path.Base(src)
	if src == "/" {
		prefix = "."
	}
	r, cancel, err := vm.archiveReader(ctx, src)
	if err != nil {
		return err
	}
	defer cancel()
	if err := extractArchive(r, plan.dir, downloadRename(prefix, plan.name)); err != nil {
		return fail(err)
	}
	return nil
}

// downloadRename maps the names of a guest's archive of prefix (its base
// name, or "." for the root) to name, the path Download writes it at.
func downloadRename(prefix, name string) func(string) (string, error) {
	return func(entry string) (string, error) {
		rel := path.Clean(entry)
		if prefix != "." {
			rest, ok := strings.CutPrefix(rel, prefix)
			if !ok || (rest != "" && rest[0] != '/') {
				return "", fmt.Errorf("entry is not under %s", prefix)
			}
			rel = rest
		}
		return path.Join(name, strings.TrimPrefix(rel, "/")), nil
	}
}

// downloadFile copies the regular guest file src (described by sfi) to
// name in the local folder dir: only its data crosses (the guest skips
// its holes, and blocks of zeros become holes here too), after a check
// that dir's disk has room for what the file takes in the guest.
func (vm *VM) downloadFile(ctx context.Context, src string, sfi *FileInfo, dir, name string, fail func(error) error) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fail(fmt.Errorf("open %s: %w", dir, unwrapPathErr(err)))
	}
	defer root.Close()
	if fi, err := root.Lstat(name); err == nil && fi.IsDir() {
		return fail(fmt.Errorf("%s is a directory: remove it first", filepath.Join(dir, name)))
	}
	need := sfi.size
	if sfi.allocated >= 0 && sfi.allocated < need {
		need = sfi.allocated // sparse in the guest, and here
	}
	what := src
	if need < sfi.size {
		what += " (sparse: " + sizeString(sfi.size) + " apparent size)"
	}
	if err := checkSpace(dir, need, what, copyFix); err != nil {
		return fail(err)
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := a.ReadFile(cctx, &agentpb.ReadFileRequest{Path: src, Sparse: true})
	if err != nil {
		return vm.callErr(ctx, "read "+src, fileErr(err))
	}
	x := &hostExtractor{root: root, dir: dir}
	mode := sfi.mode & (fs.ModePerm | fs.ModeSticky)
	err = x.writeFile(name, mode, sfi.mtime, func(sf *sparseFile) (int64, error) {
		for {
			c, err := stream.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = errors.New("the guest ended the file without its size")
				}
				return 0, &callError{vm.callErr(ctx, "read "+src, fileErr(err))}
			}
			if c.Offset < sf.end || c.Offset+int64(len(c.Data)) > sfi.size {
				// Its stat said the size (the free-space check used it):
				// the guest does not make the file larger on the host.
				return 0, &callError{fmt.Errorf("read %s in VM %s: the guest sent data at offset %d after %d, or past the file's size %d (it grew while being copied? copy it again)", src, vm.name, c.Offset, sf.end, sfi.size)}
			}
			if c.Last {
				return c.Offset, nil
			}
			if err := sf.WriteAt(c.Data, c.Offset); err != nil {
				return 0, err
			}
		}
	})
	if err != nil {
		return fail(err)
	}
	return nil
}

// ExtractArchive extracts a tar stream (such as one from GetArchive) under
// the local directory dir, with the care Download takes: names that climb
// out of dir and entries that would be written through a symlink are
// refused, symlinks are created but never followed, setuid and setgid bits
// are dropped, and devices and FIFOs are skipped.
func ExtractArchive(r io.Reader, dir string) error {
	if err := extractArchive(r, dir, func(name string) (string, error) { return name, nil }); err != nil {
		return unwrapCallErr(err)
	}
	return nil
}

// extractArchive extracts r under dir; rename maps each entry name (after
// the checks for escapes) to the path it is written at, relative to dir.
// The rules are tarx's (no escapes, symlinks never followed, setuid and
// setgid dropped, sparse files refused); regular files are written as
// writeFile writes them.
func extractArchive(r io.Reader, dir string, rename func(string) (string, error)) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, unwrapPathErr(err))
	}
	defer root.Close()
	x := &hostExtractor{root: root, dir: dir}
	_, err = tarx.Extract(r, root, tarx.Options{
		Rename: rename,
		WriteFile: func(_ *os.Root, rel string, mode fs.FileMode, mtime time.Time, r io.Reader, size int64) (n int64, err error) {
			err = x.writeFile(rel, mode, mtime, func(sf *sparseFile) (int64, error) {
				n, err = io.Copy(sf, r)
				return size, err
			})
			return n, err
		},
		PassThrough: func(err error) bool { return isGuestErr(err) || errors.As(err, new(*callError)) },
	})
	return x.tarErr(err)
}

type hostExtractor struct {
	root *os.Root
	dir  string
}

// tarErr words an extraction's error for the host's user.
func (x *hostExtractor) tarErr(err error) error {
	var e *tarx.Error
	if !errors.As(err, &e) {
		return err
	}
	full := filepath.Join(x.dir, filepath.FromSlash(e.Path))
	switch e.Kind {
	case tarx.Refused:
		return fmt.Errorf("%w: refusing archive entry %q: %s (extracting into %s)", ErrInvalid, e.Name, e.Why, x.dir)
	case tarx.Conflict:
		return fmt.Errorf("archive entry %q: %s is a directory: remove it first", e.Name, full)
	case tarx.BadStream:
		return fmt.Errorf("bad tar stream after %d entries: %w", e.Entries, e.Err)
	}
	cause := e.Err
	if e.Op == "create" {
		cause = noSpace(filepath.Dir(full), cause, copyFix)
	}
	return fmt.Errorf("%s %s: %w", e.Op, full, cause)
}

// writeFile writes the regular file rel with what fill writes (and the
// size it returns): into a new file beside it, whose blocks of zeros are
// left as holes, renamed to rel once complete, so that a copy that fails
// (a full disk, an error of the guest, a cancel) leaves nothing behind. A
// symlink at rel is replaced, never followed.
func (x *hostExtractor) writeFile(rel string, mode fs.FileMode, mtime time.Time, fill func(*sparseFile) (int64, error)) (err error) {
	full := filepath.Join(x.dir, filepath.FromSlash(rel))
	f, tmp, err := createTemp(x.root, rel)
	if err != nil {
		return fmt.Errorf("create %s: %w", full, noSpace(filepath.Dir(full), unwrapPathErr(err), copyFix))
	}
	defer func() {
		if err != nil {
			f.Close()
			_ = x.root.Remove(tmp)
		}
	}()
	sf := &sparseFile{f: f}
	size, err := fill(sf)
	if err == nil {
		err = sf.finish(size)
	}
	if err != nil {
		if isGuestErr(err) || errors.As(err, new(*callError)) {
			return err
		}
		return fmt.Errorf("write %s: %w", full, noSpace(filepath.Dir(full), unwrapPathErr(err), copyFix))
	}
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %s: %w", full, err)
	}
	if !mtime.IsZero() {
		tv := []unix.Timeval{unix.NsecToTimeval(mtime.UnixNano()), unix.NsecToTimeval(mtime.UnixNano())}
		_ = unix.Futimes(int(f.Fd()), tv)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", full, noSpace(filepath.Dir(full), unwrapPathErr(err), copyFix))
	}
	if err := x.root.Rename(tmp, rel); err != nil {
		return fmt.Errorf("rename %s: %w", full, unwrapPathErr(err))
	}
	return nil
}

// copyFix is what to do when a copy out of a VM finds its disk full.
const copyFix = "copy to another disk"
