package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/fsnotify/fsnotify"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Bounds of directory watching: each watch is an inotify instance (the
// kernel allows 128 per user by default; the commands need some too) with
// one inotify watch per folder, and its events wait in a queue of bounded
// length while the host is slow to read them.
const (
	maxWatchStreams = 32
	maxWatchDirs    = 8192
	maxWatchQueue   = 4096
	maxWatchBatch   = 256
)

// watchQueueFull, when set (by a test), is called when a watch's queue
// first overflows.
var watchQueueFull func()

// watchSlots counts the watch streams open in this agent.
var watchSlots = make(chan struct{}, maxWatchStreams)

// WatchDir streams the changes under a directory: inotify (through
// fsnotify) on the directory and, when recursive, on every folder below it,
// those made later included. The started response goes out once every
// watch is in place.
func (s *Server) WatchDir(req *agentpb.WatchDirRequest, stream grpc.ServerStreamingServer[agentpb.WatchDirResponse]) error {
	root, err := cleanPath(req.GetPath())
	if err != nil {
		return err
	}
	fi, err := os.Stat(root)
	if err != nil {
		return fsError("watch", root, err)
	}
	if !fi.IsDir() {
		return status.Errorf(codes.FailedPrecondition, "watch %s: not a directory", root)
	}
	select {
	case watchSlots <- struct{}{}:
		defer func() { <-watchSlots }()
	default:
		return status.Errorf(codes.ResourceExhausted, "watch %s: the guest has %d directory watches open, the most it allows: stop one first", root, maxWatchStreams)
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return status.Errorf(codes.ResourceExhausted, "watch %s: %v", root, err)
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	w := &dirWatch{root: root, recursive: req.GetRecursive(), fw: fw, dirs: map[string]bool{}, wake: make(chan struct{}, 1)}
	defer func() { _ = fw.Close() }() // closing twice is a no-op
	if err := w.add(root, false); err != nil {
		return err
	}
	if err := stream.Send(&agentpb.WatchDirResponse{Started: true}); err != nil {
		return err
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		w.read(ctx)
	}()
	err = w.send(ctx, stream, readDone)
	cancel()
	_ = fw.Close() // ends read
	<-readDone
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.end
}

// dirWatch is one WatchDir stream: read turns fsnotify's events into a
// bounded queue, send drains it onto the stream.
type dirWatch struct {
	root      string
	recursive bool
	fw        *fsnotify.Watcher
	dirs      map[string]bool // folders watched (read's alone)

	mu       sync.Mutex
	queue    []*agentpb.WatchEvent
	overflow bool
	end      error // why the watch ended, set before read returns
	wake     chan struct{}
}

// add watches dir and, when recursive, the folders below it. With report,
// the entries found below dir are queued as created: they may have
// appeared before the watch was in place (mkdir -p a/b/c; a new folder's
// first file).
func (w *dirWatch) add(dir string, report bool) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == dir && !report {
				return fsError("watch", p, err)
			}
			return nil // gone already, or unreadable: nothing to watch
		}
		if report && p != dir {
			w.push(p, agentpb.WatchOp_WATCH_OP_CREATE)
		}
		if !d.IsDir() {
			return nil
		}
		if p != dir && !w.recursive {
			return fs.SkipDir
		}
		if len(w.dirs) >= maxWatchDirs {
			return status.Errorf(codes.ResourceExhausted, "watch %s: more than %d folders below it, the most one watch follows: watch a smaller tree, or not recursively", w.root, maxWatchDirs)
		}
		if err := w.fw.Add(p); err != nil {
			if p == w.root {
				return fsError("watch", p, err)
			}
			if errors.Is(err, fs.ErrNotExist) {
				return fs.SkipDir
			}
			// The kernel's limit (fs.inotify.max_user_watches) or a folder
			// that vanished mid-walk: say so, and go on.
			return status.Errorf(codes.ResourceExhausted, "watch %s: %v (the guest's fs.inotify.max_user_watches?)", p, err)
		}
		w.dirs[p] = true
		return nil
	})
}

// forget drops the watches on dir and below it (a folder moved away: its
// watches would go on reporting under the old path).
func (w *dirWatch) forget(dir string) {
	for p := range w.dirs {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			_ = w.fw.Remove(p)
			delete(w.dirs, p)
		}
	}
}

// push queues an event, or notes the overflow when the queue is full.
func (w *dirWatch) push(p string, op agentpb.WatchOp) {
	w.mu.Lock()
	if len(w.queue) >= maxWatchQueue {
		if !w.overflow && watchQueueFull != nil {
			watchQueueFull()
		}
		w.overflow = true
	} else {
		w.queue = append(w.queue, &agentpb.WatchEvent{Path: p, Op: op})
	}
	w.mu.Unlock()
	w.signal()
}

// signal wakes send.
func (w *dirWatch) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// stop records why the watch ends.
func (w *dirWatch) stop(err error) {
	w.mu.Lock()
	if w.end == nil {
		w.end = err
	}
	w.mu.Unlock()
}

var watchOps = []struct {
	fs fsnotify.Op
	op agentpb.WatchOp
}{
	{fsnotify.Create, agentpb.WatchOp_WATCH_OP_CREATE},
	{fsnotify.Write, agentpb.WatchOp_WATCH_OP_WRITE},
	{fsnotify.Remove, agentpb.WatchOp_WATCH_OP_REMOVE},
	{fsnotify.Rename, agentpb.WatchOp_WATCH_OP_RENAME},
	{fsnotify.Chmod, agentpb.WatchOp_WATCH_OP_CHMOD},
}

// read handles fsnotify's events until ctx ends, the watcher closes or the
// watched directory goes.
func (w *dirWatch) read(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case err, ok := <-w.fw.Errors:
			if !ok {
				return
			}
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				w.mu.Lock()
				w.overflow = true
				w.mu.Unlock()
				w.signal()
				continue
			}
			w.stop(status.Errorf(codes.Internal, "watch %s: %v", w.root, err))
			return
		case ev, ok := <-w.fw.Events:
			if !ok {
				return
			}
			p := filepath.Clean(ev.Name)
			if p == w.root {
				if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
					w.stop(status.Errorf(codes.NotFound, "watch %s: the directory was removed or moved", w.root))
					return
				}
				continue // the root's own mode or time
			}
			if !strings.HasPrefix(p, w.root+"/") && w.root != "/" {
				continue
			}
			if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				w.forget(p)
			}
			for _, o := range watchOps {
				if ev.Has(o.fs) {
					w.push(p, o.op)
				}
			}
			if w.recursive && ev.Has(fsnotify.Create) {
				if fi, err := os.Lstat(p); err == nil && fi.IsDir() {
					if err := w.add(p, true); err != nil {
						w.stop(err)
						return
					}
				}
			}
		}
	}
}

// send drains the queue onto the stream in batches until the stream ends
// or read has ended and the queue is empty.
func (w *dirWatch) send(ctx context.Context, stream grpc.ServerStreamingServer[agentpb.WatchDirResponse], readDone <-chan struct{}) error {
	final := false
	for {
		w.mu.Lock()
		n := min(len(w.queue), maxWatchBatch)
		batch := w.queue[:n:n]
		w.queue = w.queue[n:]
		if len(w.queue) == 0 {
			w.queue = nil // let the old array go
		}
		overflow := w.overflow
		w.overflow = false
		w.mu.Unlock()
		if len(batch) > 0 || overflow {
			if err := stream.Send(&agentpb.WatchDirResponse{Events: batch, Overflow: overflow}); err != nil {
				return err
			}
			continue
		}
		if final {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-readDone:
			final = true // one more pass takes what read queued last
		case <-w.wake:
		}
	}
}
