package e2b

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"slices"
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
	// watchEvery is how often a watch lists its directory: the guest has
	// no file-change notifications over the agent, so a watch compares
	// listings (one agent call each).
	watchEvery = 500 * time.Millisecond
	// watchDepth is how deep a recursive watch looks.
	watchDepth = 32
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

// seen is what a watch knows of one entry.
type seen struct {
	mode  fs.FileMode
	size  int64
	mtime time.Time
	info  *smolvm.FileInfo
}

// WatchDir streams changes under a directory: it lists the directory
// every watchEvery and reports what appeared (create), went (remove),
// changed size or time (write) or mode (chmod). Events name the entry
// relative to the watched directory, as envd does.
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
	depth := 1
	if req.Msg.Recursive {
		depth = watchDepth
	}
	list := func() (map[string]seen, error) {
		fis, err := sb.vm.Walk(ctx, p, depth)
		if err != nil {
			return nil, err
		}
		m := make(map[string]seen, len(fis))
		for _, fi := range fis {
			m[fi.Path()] = seen{fi.Mode(), fi.Size(), fi.ModTime(), fi}
		}
		return m, nil
	}
	before, err := list()
	if err != nil {
		return connectErr(err)
	}
	if err := stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	send := func(full string, t pb.EventType, fi *smolvm.FileInfo) error {
		name := strings.TrimPrefix(strings.TrimPrefix(full, p), "/")
		ev := &pb.FilesystemEvent{Name: name, Type: t}
		if req.Msg.IncludeEntry && fi != nil {
			ev.Entry = entryInfo(fi)
		}
		return stream.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: ev}})
	}
	poll := time.NewTicker(watchEvery)
	defer poll.Stop()
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
		case <-poll.C:
			after, err := list()
			if errors.Is(err, fs.ErrNotExist) || errors.Is(err, smolvm.ErrNotFound) {
				return send(p, pb.EventType_EVENT_TYPE_REMOVE, nil)
			}
			if err != nil {
				return connectErr(err)
			}
			for _, ev := range diffListings(before, after) {
				if err := send(ev.path, ev.typ, ev.info); err != nil {
					return err
				}
			}
			before = after
		}
	}
}

type watchEvent struct {
	path string
	typ  pb.EventType
	info *smolvm.FileInfo
}

// diffListings is what changed from one listing to the next, in path
// order.
func diffListings(before, after map[string]seen) []watchEvent {
	var out []watchEvent
	for p, a := range after {
		b, ok := before[p]
		switch {
		case !ok:
			out = append(out, watchEvent{p, pb.EventType_EVENT_TYPE_CREATE, a.info})
		case b.mode.Type() != a.mode.Type():
			out = append(out, watchEvent{p, pb.EventType_EVENT_TYPE_REMOVE, nil}, watchEvent{p, pb.EventType_EVENT_TYPE_CREATE, a.info})
		case b.size != a.size || !b.mtime.Equal(a.mtime):
			out = append(out, watchEvent{p, pb.EventType_EVENT_TYPE_WRITE, a.info})
		case b.mode != a.mode:
			out = append(out, watchEvent{p, pb.EventType_EVENT_TYPE_CHMOD, a.info})
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			out = append(out, watchEvent{p, pb.EventType_EVENT_TYPE_REMOVE, nil})
		}
	}
	// By path; within one path the order built above stays.
	slices.SortStableFunc(out, func(a, b watchEvent) int { return strings.Compare(a.path, b.path) })
	return out
}
