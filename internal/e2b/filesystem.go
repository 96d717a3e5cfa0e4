package e2b

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/smolvm/smolvm"
	pb "github.com/smolvm/smolvm/internal/e2b/proto/filesystem"
	"github.com/smolvm/smolvm/internal/e2b/proto/filesystem/filesystemconnect"
)

// Bounds of directory watching.
const (
	// maxWatches is how many WatchDir streams one sandbox has at once.
	maxWatches = 16
)

// filesystemService implements filesystem.Filesystem for all sandboxes.
// The polled watchers (CreateWatcher…) are not offered: the SDK watches
// with WatchDir.
type filesystemService struct {
	filesystemconnect.UnimplementedFilesystemHandler
	e *envd
}

// fsCall resolves a filesystem RPC's sandbox and guest path.
func (s *filesystemService) fsCall(ctx context.Context, h http.Header, p string) (*envdSandbox, string, error) {
	sb, err := s.e.sandbox(ctx, h)
	if err != nil {
		return nil, "", err
	}
	gp, err := guestPath(p, basicUser(h.Get("Authorization")))
	if err != nil {
		return nil, "", connectErr(err)
	}
	return sb, gp, nil
}

// entryInfo describes a guest file as envd does (mode and permissions
// are Go's fs.FileMode bits and string).
func entryInfo(fi *smolvm.FileInfo) *pb.EntryInfo {
	_, _, owner, group := fi.Owner()
	e := &pb.EntryInfo{Name: fi.Name(), Path: fi.Path(), Size: fi.Size(), Mode: uint32(fi.Mode()),
		Permissions: fi.Mode().String(), Owner: owner, Group: group, ModifiedTime: timestamppb.New(fi.ModTime())}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		e.Type = pb.FileType_FILE_TYPE_SYMLINK
		t := fi.LinkTarget()
		e.SymlinkTarget = &t
	case fi.IsDir():
		e.Type = pb.FileType_FILE_TYPE_DIRECTORY
	case fi.Mode().IsRegular():
		e.Type = pb.FileType_FILE_TYPE_FILE
	}
	return e
}

func (s *filesystemService) Stat(ctx context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	sb, p, err := s.fsCall(ctx, req.Header(), req.Msg.Path)
	if err != nil {
		return nil, err
	}
	fi, err := sb.vm.Stat(ctx, p)
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: entryInfo(fi)}), nil
}

func (s *filesystemService) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	sb, p, err := s.fsCall(ctx, req.Header(), req.Msg.Path)
	if err != nil {
		return nil, err
	}
	created, err := sb.vm.MkdirAll(ctx, p, 0o755)
	if err != nil {
		return nil, connectErr(err)
	}
	if !created {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("directory %s already exists", p))
	}
	fi, err := sb.vm.Stat(ctx, p)
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: entryInfo(fi)}), nil
}

func (s *filesystemService) Move(ctx context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	sb, from, err := s.fsCall(ctx, req.Header(), req.Msg.Source)
	if err != nil {
		return nil, err
	}
	to, err := guestPath(req.Msg.Destination, basicUser(req.Header().Get("Authorization")))
	if err != nil {
		return nil, connectErr(err)
	}
	if err := sb.vm.Rename(ctx, from, to); err != nil {
		return nil, connectErr(err)
	}
	fi, err := sb.vm.Stat(ctx, to)
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: entryInfo(fi)}), nil
}

func (s *filesystemService) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	sb, p, err := s.fsCall(ctx, req.Header(), req.Msg.Path)
	if err != nil {
		return nil, err
	}
	depth := max(int(min(req.Msg.Depth, 1<<16)), 1)
	fis, err := sb.vm.Walk(ctx, p, depth)
	if err != nil {
		return nil, connectErr(err)
	}
	out := &pb.ListDirResponse{Entries: make([]*pb.EntryInfo, 0, len(fis))}
	for _, fi := range fis {
		out.Entries = append(out.Entries, entryInfo(fi))
	}
	return connect.NewResponse(out), nil
}

func (s *filesystemService) Remove(ctx context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	sb, p, err := s.fsCall(ctx, req.Header(), req.Msg.Path)
	if err != nil {
		return nil, err
	}
	if err := sb.vm.Remove(ctx, p); err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// watchOps are E2B's names of the library's watch operations.
var watchOps = map[smolvm.DirOp]pb.EventType{
	smolvm.DirCreate: pb.EventType_EVENT_TYPE_CREATE,
	smolvm.DirWrite:  pb.EventType_EVENT_TYPE_WRITE,
	smolvm.DirRemove: pb.EventType_EVENT_TYPE_REMOVE,
	smolvm.DirRename: pb.EventType_EVENT_TYPE_RENAME,
	smolvm.DirChmod:  pb.EventType_EVENT_TYPE_CHMOD,
}

// WatchDir streams changes under a directory as the guest's inotify
// reports them (VM.WatchDir). The start event goes out once the watch is
// in place, so no change after the SDK's watchDir returns is missed.
// Events name the entry relative to the watched directory, as envd does;
// the directory's own removal is a remove event with an empty name, and
// the end of the stream.
func (s *filesystemService) WatchDir(ctx context.Context, req *connect.Request[pb.WatchDirRequest], stream *connect.ServerStream[pb.WatchDirResponse]) error {
	sb, p, err := s.fsCall(ctx, req.Header(), req.Msg.Path)
	if err != nil {
		return err
	}
	fi, err := sb.vm.Stat(ctx, p)
	if err != nil {
		return connectErr(err)
	}
	if !fi.IsDir() {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s is not a directory: watch a directory", p))
	}
	sb.watchMu.Lock()
	if sb.watches >= maxWatches {
		sb.watchMu.Unlock()
		return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("sandbox has %d directory watches, the limit: stop one first", maxWatches))
	}
	sb.watches++
	sb.watchMu.Unlock()
	defer func() {
		sb.watchMu.Lock()
		sb.watches--
		sb.watchMu.Unlock()
	}()
	w, err := sb.vm.WatchDir(ctx, p, req.Msg.Recursive)
	if err != nil {
		return connectErr(err)
	}
	defer w.Close()
	if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	send := func(full string, t pb.EventType) error {
		name := strings.TrimPrefix(strings.TrimPrefix(full, p), "/")
		ev := &pb.FilesystemEvent{Name: name, Type: t}
		if req.Msg.IncludeEntry && t != pb.EventType_EVENT_TYPE_REMOVE && t != pb.EventType_EVENT_TYPE_RENAME {
			if fi, err := sb.vm.Stat(ctx, full); err == nil {
				ev.Entry = entryInfo(fi)
			}
		}
		return stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: ev}})
	}
	keep := keepaliveOf(req.Header())
	var keepC <-chan time.Time
	if keep > 0 {
		k := time.NewTicker(keep)
		defer k.Stop()
		keepC = k.C
	}
	for {
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return nil // the watch's timeoutMs: a clean end
			}
			return connect.NewError(connect.CodeCanceled, ctx.Err())
		case <-s.e.h.stop:
			return errStopping()
		case <-sb.ctx.Done():
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("sandbox %s is gone", sb.id))
		case <-keepC:
			if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Keepalive{Keepalive: &pb.WatchDirResponse_KeepAlive{}}}); err != nil {
				return err
			}
		case ev, ok := <-w.Events():
			if !ok {
				err := w.Err()
				if errors.Is(err, fs.ErrNotExist) || errors.Is(err, smolvm.ErrNotFound) {
					return send(p, pb.EventType_EVENT_TYPE_REMOVE)
				}
				if err != nil {
					return connectErr(err)
				}
				return connect.NewError(connect.CodeCanceled, errors.New("the watch ended"))
			}
			if ev.Op == smolvm.DirOverflow {
				return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("the watch of %s lost events (more changes than it queues): watch again and list the directory", p))
			}
			if err := send(ev.Path, watchOps[ev.Op]); err != nil {
				return err
			}
		}
	}
}
