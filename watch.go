package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// DirOp is what happened to a path under a watched directory.
type DirOp uint8

// The operations of DirEvent, as E2B's envd (fsnotify) names them.
const (
	// DirCreate: the path was made (a file, folder or link), or renamed to
	// this name.
	DirCreate DirOp = iota + 1
	// DirWrite: the file was written to (one event per write, not per close).
	DirWrite
	// DirRemove: the path was removed.
	DirRemove
	// DirRename: the path was renamed away; its new name, when under the
	// watched directory, comes as a DirCreate.
	DirRename
	// DirChmod: the path's attributes (mode, owner, times) changed.
	DirChmod
	// DirOverflow: events were lost (the guest's or the reader's queue was
	// full); Path is the watched directory. List it again to learn its state.
	DirOverflow
)

func (o DirOp) String() string {
	switch o {
	case DirCreate:
		return "create"
	case DirWrite:
		return "write"
	case DirRemove:
		return "remove"
	case DirRename:
		return "rename"
	case DirChmod:
		return "chmod"
	case DirOverflow:
		return "overflow"
	}
	return fmt.Sprintf("DirOp(%d)", uint8(o))
}

// DirEvent is one change under a watched directory.
type DirEvent struct {
	Path string // absolute path in the guest
	Op   DirOp
}

func (e DirEvent) String() string { return e.Op.String() + " " + e.Path }

// DirWatch is an open WatchDir: its events arrive on Events until the
// watch ends (Close, the context, the directory removed or moved, the VM
// gone), then Events is closed and Err says why.
type DirWatch struct {
	dir    string
	events chan DirEvent
	cancel context.CancelFunc
	done   chan struct{}
	err    error // set before done closes
}

// Events returns the channel of events, closed when the watch ends. A
// reader that falls more than 1024 events behind loses events, reported
// as a DirOverflow.
func (w *DirWatch) Events() <-chan DirEvent { return w.events }

// Err returns why the watch ended, once Events is closed: nil after Close
// or the end of WatchDir's context.
func (w *DirWatch) Err() error {
	select {
	case <-w.done:
		return w.err
	default:
		return nil
	}
}

// Close ends the watch and waits for its goroutine: Events is closed.
func (w *DirWatch) Close() {
	w.cancel()
	<-w.done
}

// WatchDir watches a directory in the guest with inotify and reports its
// changes: those of its entries and, with recursive, of everything below
// it (folders made later are watched too). It returns once the watch is in
// place: no change after that is missed. The guest bounds a watch (32 open
// at once, 8192 folders each; more is an error wrapping ErrCapacity) and drops
// events when the reader falls far behind, reporting a DirOverflow. The
// watch lasts until Close, the end of ctx, or the directory's removal or
// move (Err then wraps ErrNotFound).
func (vm *VM) WatchDir(ctx context.Context, dir string, recursive bool) (*DirWatch, error) {
	if err := checkGuestPath(dir); err != nil {
		return nil, err
	}
	dir = path.Clean(dir)
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, err
	}
	what := "watch " + dir
	wctx, cancel := context.WithCancel(ctx)
	stream, err := a.WatchDir(wctx, &agentpb.WatchDirRequest{Path: dir, Recursive: recursive})
	if err == nil {
		var first *agentpb.WatchDirResponse
		if first, err = stream.Recv(); err == nil && !first.GetStarted() {
			err = fmt.Errorf("the guest's first answer did not start the watch")
		}
	}
	if err != nil {
		cancel()
		return nil, vm.callErr(ctx, what, watchErr(err))
	}
	// One place more than watchBuffer: for the overflow that follows a
	// full buffer.
	w := &DirWatch{dir: dir, events: make(chan DirEvent, watchBuffer+1), cancel: cancel, done: make(chan struct{})}
	go func() {
		err := vm.watchLoop(wctx, w, stream.Recv)
		if err != nil && wctx.Err() == nil {
			w.err = vm.callErr(wctx, what, watchErr(err))
		}
		cancel()
		close(w.events)
		close(w.done)
	}()
	return w, nil
}

// watchBuffer is how many events wait for the reader on the host; past it
// they are dropped (and a DirOverflow queued), so that a reader that does
// not keep up never stalls the stream, which would hold the guest's events.
const watchBuffer = 1024

// watchErr is fileErr, and the guest's bounds on watches (ResourceExhausted
// from WatchDir, which means no disk space elsewhere) wrap ErrCapacity.
func watchErr(err error) error {
	if s, ok := status.FromError(err); ok && s.Code() == codes.ResourceExhausted {
		return &guestError{msg: s.Message(), kinds: []error{ErrCapacity}}
	}
	return fileErr(err)
}

// watchOps maps the guest's operations.
var watchOps = map[agentpb.WatchOp]DirOp{
	agentpb.WatchOp_WATCH_OP_CREATE: DirCreate,
	agentpb.WatchOp_WATCH_OP_WRITE:  DirWrite,
	agentpb.WatchOp_WATCH_OP_REMOVE: DirRemove,
	agentpb.WatchOp_WATCH_OP_RENAME: DirRename,
	agentpb.WatchOp_WATCH_OP_CHMOD:  DirChmod,
}

// watchLoop hands the guest's events to w until the stream ends. An event
// the guest sends outside the directory or with an unknown operation is an
// error: the guest is not trusted.
func (vm *VM) watchLoop(ctx context.Context, w *DirWatch, recv func() (*agentpb.WatchDirResponse, error)) error {
	prefix := strings.TrimSuffix(w.dir, "/") + "/"
	lost := false // an overflow is queued, in the place kept for it
	deliver := func(ev DirEvent) bool {
		if ctx.Err() != nil {
			return false
		}
		if len(w.events) < watchBuffer {
			lost = false
			w.events <- ev // the only sender: there is room
		} else if !lost {
			lost = true
			w.events <- DirEvent{Path: w.dir, Op: DirOverflow}
		}
		return true
	}
	for {
		r, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if r.GetOverflow() && !lost && !deliver(DirEvent{Path: w.dir, Op: DirOverflow}) {
			return nil
		}
		for _, e := range r.GetEvents() {
			op, ok := watchOps[e.GetOp()]
			p := e.GetPath()
			if !ok || path.Clean(p) != p || !strings.HasPrefix(p, prefix) {
				return fmt.Errorf("VM %s: the guest sent a malformed watch event %q %v", vm.name, p, e.GetOp())
			}
			if !deliver(DirEvent{Path: p, Op: op}) {
				return nil
			}
		}
	}
}
