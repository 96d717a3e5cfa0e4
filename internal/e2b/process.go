package e2b

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm"
	pb "github.com/smolvm/smolvm/internal/e2b/proto/process"
)

// Bounds of the process table. A sandbox's commands outlive the requests
// that started them (a background command keeps running when its client
// goes), so what they print must be held somewhere, and never without a
// bound.
const (
	// maxProcs is how many commands a sandbox runs at once through envd
	// (with detachedMax, at most 32 MiB of kept output per sandbox).
	maxProcs = 64
	// chunkMax splits output into events of at most this size.
	chunkMax = 32 << 10
	// subscriberQueue is how many events wait for one slow client before
	// the command's output waits for it (flow control reaches the guest).
	subscriberQueue = 64
	// detachedMax is how much output a command with no client attached
	// keeps for the next Connect; older output is dropped beyond it.
	detachedMax = 512 << 10
	// inputMax bounds one SendInput.
	inputMax = 1 << 20
)

// proc is one command started through envd.
type proc struct {
	pid  uint32
	tag  string
	conf *pb.ProcessConfig
	cmd  *smolvm.Cmd
	pty  bool

	stdinMu sync.Mutex
	stdin   *io.PipeWriter // nil: started without stdin

	mu       sync.Mutex
	subs     map[*subscriber]struct{}
	detached []*pb.ProcessEvent // output while no client was attached
	detBytes int
	end      *pb.ProcessEvent_EndEvent
	done     chan struct{} // closed when end is set
}

// subscriber is one client stream (Start or Connect) of a command.
type subscriber struct {
	events chan *pb.ProcessEvent
	gone   chan struct{} // closed when the stream ends
}

// procTable holds the commands of one sandbox.
type procTable struct {
	mu    sync.Mutex
	procs map[uint32]*proc
}

func newProcTable() *procTable { return &procTable{procs: map[uint32]*proc{}} }

// find returns the command a selector names.
func (t *procTable) find(sel *pb.ProcessSelector) (*proc, error) {
	if sel == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector missing: give a pid or a tag"))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch s := sel.Selector.(type) {
	case *pb.ProcessSelector_Pid:
		if p, ok := t.procs[s.Pid]; ok {
			return p, nil
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d not found (it may have exited)", s.Pid))
	case *pb.ProcessSelector_Tag:
		for _, p := range t.procs {
			if p.tag != "" && p.tag == s.Tag {
				return p, nil
			}
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with tag %q not found (it may have exited)", s.Tag))
	}
	return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector empty: give a pid or a tag"))
}

// outputWriter turns a command's output into data events.
type outputWriter struct {
	p    *proc
	kind int // 1 stdout, 2 stderr, 3 pty
}

func (w outputWriter) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		c := min(len(b), chunkMax)
		data := append([]byte(nil), b[:c]...)
		b = b[c:]
		ev := &pb.ProcessEvent_DataEvent{}
		switch w.kind {
		case 1:
			ev.Output = &pb.ProcessEvent_DataEvent_Stdout{Stdout: data}
		case 2:
			ev.Output = &pb.ProcessEvent_DataEvent_Stderr{Stderr: data}
		default:
			ev.Output = &pb.ProcessEvent_DataEvent_Pty{Pty: data}
		}
		w.p.publish(&pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: ev}}, c)
	}
	return n, nil
}

// publish hands an output event to every attached client, waiting for
// one whose queue is full (its stream's backpressure reaches the command),
// or keeps it for the next client when none is attached.
func (p *proc) publish(ev *pb.ProcessEvent, size int) {
	p.mu.Lock()
	if len(p.subs) == 0 {
		p.detached = append(p.detached, ev)
		p.detBytes += size
		for p.detBytes > detachedMax && len(p.detached) > 1 {
			old := p.detached[0]
			p.detached = p.detached[1:]
			p.detBytes -= dataLen(old)
		}
		p.mu.Unlock()
		return
	}
	subs := make([]*subscriber, 0, len(p.subs))
	for s := range p.subs {
		subs = append(subs, s)
	}
	p.mu.Unlock()
	for _, s := range subs {
		select {
		case s.events <- ev:
		case <-s.gone:
		}
	}
}

func dataLen(ev *pb.ProcessEvent) int {
	d := ev.GetData()
	return len(d.GetStdout()) + len(d.GetStderr()) + len(d.GetPty())
}

// attach adds a client and returns the output kept while nobody listened,
// which the client gets before what follows.
func (p *proc) attach() (*subscriber, []*pb.ProcessEvent) {
	s := &subscriber{events: make(chan *pb.ProcessEvent, subscriberQueue), gone: make(chan struct{})}
	p.mu.Lock()
	defer p.mu.Unlock()
	backlog := p.detached
	p.detached, p.detBytes = nil, 0
	p.subs[s] = struct{}{}
	return s, backlog
}

func (p *proc) detach(s *subscriber) {
	p.mu.Lock()
	delete(p.subs, s)
	p.mu.Unlock()
	close(s.gone)
}

// sender is a server stream of process events (Start's or Connect's).
type sender func(*pb.ProcessEvent) error

// stream sends the start event, the output and the end of p to one client
// until the command ends or the client goes, with keepalives between.
func (p *proc) stream(ctx context.Context, send sender, keepalive time.Duration, stop <-chan struct{}) error {
	s, backlog := p.attach()
	defer p.detach(s)
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}); err != nil {
		return err
	}
	for _, ev := range backlog {
		if err := send(ev); err != nil {
			return err
		}
	}
	var tick <-chan time.Time
	if keepalive > 0 {
		t := time.NewTicker(keepalive)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case ev := <-s.events:
			if err := send(ev); err != nil {
				return err
			}
			continue
		default:
		}
		select {
		case ev := <-s.events:
			if err := send(ev); err != nil {
				return err
			}
		case <-p.done:
			// Output published before the end is queued: drain it first.
			for {
				select {
				case ev := <-s.events:
					if err := send(ev); err != nil {
						return err
					}
					continue
				default:
				}
				break
			}
			return send(&pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: p.end}})
		case <-tick:
			if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		case <-ctx.Done():
			return streamEnd(ctx)
		case <-stop:
			return errStopping()
		}
	}
}

// streamEnd is how a stream ends when its client's context does: past the
// request's deadline (the command's timeoutMs) as DeadlineExceeded, which
// the SDK reports as a timeout.
func streamEnd(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return connect.NewError(connect.CodeDeadlineExceeded, errors.New("command timed out and was killed (its timeoutMs passed)"))
	}
	return connect.NewError(connect.CodeCanceled, ctx.Err())
}

// exited records how the command ended and wakes its streams.
func (p *proc) exited(err error) {
	end := &pb.ProcessEvent_EndEvent{}
	var ee *smolvm.ExitError
	var se *smolvm.StartError
	switch {
	case err == nil:
		end.Exited, end.Status = true, "exit status 0"
	case errors.As(err, &ee):
		end.ExitCode = int32(ee.ExitCode)
		end.Exited = ee.Signal == 0 && !ee.TimedOut
		end.Status = ee.Error()
		msg := ee.Error()
		end.Error = &msg
	case errors.As(err, &se):
		end.ExitCode = int32(se.ExitCode)
		end.Status = "not started"
		msg := se.Error()
		end.Error = &msg
	default:
		end.ExitCode = -1
		end.Status = "error"
		msg := err.Error()
		end.Error = &msg
	}
	p.mu.Lock()
	p.end = end
	p.mu.Unlock()
	close(p.done)
}

// processService implements process.Process for all sandboxes.
type processService struct {
	e *envd
}

func (s *processService) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	sb, err := s.e.sandbox(ctx, req.Header())
	if err != nil {
		return err
	}
	conf := req.Msg.GetProcess()
	if conf == nil || conf.Cmd == "" {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd missing: name the program to run"))
	}
	sb.procs.mu.Lock()
	n := len(sb.procs.procs)
	sb.procs.mu.Unlock()
	if n >= maxProcs {
		return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("sandbox runs %d commands through this API, the limit: wait for one to end or kill one", maxProcs))
	}
	// The command belongs to the sandbox, not to this request: a client
	// that goes away leaves it running. Its timeout is the request's
	// deadline (the SDK's timeoutMs): past it, the command is killed.
	cmd := sb.vm.Command(sb.ctx, conf.Cmd, conf.Args...)
	if dl, ok := ctx.Deadline(); ok {
		cmd.Timeout = max(time.Until(dl), time.Millisecond)
	}
	for k, v := range conf.Envs {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	sort.Strings(cmd.Env)
	cmd.Dir = conf.GetCwd()
	cmd.User = basicUser(req.Header().Get("Authorization"))
	p := &proc{conf: conf, tag: req.Msg.GetTag(), cmd: cmd, subs: map[*subscriber]struct{}{}, done: make(chan struct{})}
	if pty := req.Msg.Pty; pty != nil {
		p.pty = true
		cmd.TTY = true
		cmd.Rows, cmd.Cols = uint16(pty.GetSize().GetRows()), uint16(pty.GetSize().GetCols())
		cmd.Stdout = outputWriter{p, 3}
	} else {
		cmd.Stdout, cmd.Stderr = outputWriter{p, 1}, outputWriter{p, 2}
	}
	if req.Msg.Pty != nil || req.Msg.GetStdin() {
		r, w := io.Pipe()
		cmd.Stdin, p.stdin = r, w
	}
	if err := cmd.Start(); err != nil {
		var se *smolvm.StartError
		if errors.As(err, &se) {
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
		return connectErr(err)
	}
	p.pid = uint32(cmd.Process.Pid)
	sb.procs.mu.Lock()
	sb.procs.procs[p.pid] = p
	sb.procs.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.exited(err)
		sb.procs.mu.Lock()
		delete(sb.procs.procs, p.pid)
		sb.procs.mu.Unlock()
		if p.stdin != nil {
			p.stdin.Close()
		}
	}()
	return p.stream(ctx, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.StartResponse{Event: ev})
	}, keepaliveOf(req.Header()), s.e.h.stop)
}

// target resolves the sandbox and command an RPC names.
func (s *processService) target(ctx context.Context, h http.Header, sel *pb.ProcessSelector) (*proc, error) {
	sb, err := s.e.sandbox(ctx, h)
	if err != nil {
		return nil, err
	}
	return sb.procs.find(sel)
}

func (s *processService) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	p, err := s.target(ctx, req.Header(), req.Msg.GetProcess())
	if err != nil {
		return err
	}
	return p.stream(ctx, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.ConnectResponse{Event: ev})
	}, keepaliveOf(req.Header()), s.e.h.stop)
}

func (s *processService) List(ctx context.Context, req *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	sb, err := s.e.sandbox(ctx, req.Header())
	if err != nil {
		return nil, err
	}
	sb.procs.mu.Lock()
	out := &pb.ListResponse{}
	for _, p := range sb.procs.procs {
		info := &pb.ProcessInfo{Config: p.conf, Pid: p.pid}
		if p.tag != "" {
			info.Tag = &p.tag
		}
		out.Processes = append(out.Processes, info)
	}
	sb.procs.mu.Unlock()
	sort.Slice(out.Processes, func(i, j int) bool { return out.Processes[i].Pid < out.Processes[j].Pid })
	return connect.NewResponse(out), nil
}

func (s *processService) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	p, err := s.target(ctx, req.Header(), req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.input(ctx, req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

func (s *processService) StreamInput(ctx context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	sb, err := s.e.sandbox(ctx, stream.RequestHeader())
	if err != nil {
		return nil, err
	}
	var p *proc
	for stream.Receive() {
		switch ev := stream.Msg().Event.(type) {
		case *pb.StreamInputRequest_Start:
			if p, err = sb.procs.find(ev.Start.GetProcess()); err != nil {
				return nil, err
			}
		case *pb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("input before the start event: send the process selector first"))
			}
			if err := p.input(ctx, ev.Data.GetInput()); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

// input writes stdin or terminal input to the command.
func (p *proc) input(ctx context.Context, in *pb.ProcessInput) error {
	data := append(in.GetStdin(), in.GetPty()...)
	if len(data) > inputMax {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("input of %d bytes is more than %d: send it in parts", len(data), inputMax))
	}
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d was started without stdin (start it with stdin: true) or its stdin is closed", p.pid))
	}
	// The pipe's reader is the command's stdin copier; a write waits for
	// it, bounded by the request.
	done := make(chan error, 1)
	w := p.stdin
	go func() { _, err := w.Write(data); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d no longer reads its stdin: %w", p.pid, err))
		}
		return nil
	case <-ctx.Done():
		w.CloseWithError(ctx.Err()) // the half-written input cannot be taken back
		p.stdin = nil
		return connect.NewError(connect.CodeDeadlineExceeded, fmt.Errorf("process %d did not read its input in time; its stdin is closed", p.pid))
	}
}

func (s *processService) CloseStdin(ctx context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	p, err := s.target(ctx, req.Header(), req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	p.stdinMu.Lock()
	if p.stdin != nil {
		p.stdin.Close()
		p.stdin = nil
	}
	p.stdinMu.Unlock()
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

func (s *processService) SendSignal(ctx context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	p, err := s.target(ctx, req.Header(), req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	var sig syscall.Signal
	switch req.Msg.Signal {
	case pb.Signal_SIGNAL_SIGKILL:
		sig = syscall.SIGKILL
	case pb.Signal_SIGNAL_SIGTERM:
		sig = syscall.SIGTERM
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %v not supported: send SIGNAL_SIGTERM or SIGNAL_SIGKILL", req.Msg.Signal))
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		select {
		case <-p.done: // it ended meanwhile
			return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d has exited", p.pid))
		default:
		}
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

func (s *processService) Update(ctx context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	p, err := s.target(ctx, req.Header(), req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if size := req.Msg.GetPty().GetSize(); size != nil {
		if !p.pty {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no terminal to resize: start it with a pty", p.pid))
		}
		if err := p.cmd.Resize(uint16(size.Rows), uint16(size.Cols)); err != nil {
			return nil, connectErr(err)
		}
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

// keepaliveOf reads the SDK's Keepalive-Ping-Interval header (seconds):
// how often an idle stream sends a keepalive event. Bounded to 1 s–10 min.
func keepaliveOf(h interface{ Get(string) string }) time.Duration {
	var sec int
	if _, err := fmt.Sscanf(h.Get("Keepalive-Ping-Interval"), "%d", &sec); err != nil || sec <= 0 {
		return 0
	}
	return time.Duration(min(max(sec, 1), 600)) * time.Second
}

// basicUser is the user named by envd's "Authorization: Basic user:"
// header, "" when there is none (the image's default user).
func basicUser(auth string) string {
	enc, ok := strings.CutPrefix(auth, "Basic ")
	if !ok {
		return ""
	}
	dec, err := decodeBase64(enc)
	if err != nil {
		return ""
	}
	user, _, _ := strings.Cut(dec, ":")
	return user
}
