package agent

import (
	"context"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

const (
	outputChunk = 32 << 10
	// pipeGrace is how long Exec keeps reading output after the process
	// exited, in case a background child still holds the pipes open: the
	// outputs are closed once no byte has come for this long and no chunk
	// is waiting for the host (see waitOutput).
	pipeGrace = 200 * time.Millisecond
	// stdinQueue bounds the stdin messages buffered while the process is not
	// reading, so that signals and resizes still get through.
	stdinQueue = 8
)

// outputBufs holds the output readers' buffers: two per command would
// otherwise be garbage, and garbage collection runs emulated too.
var outputBufs = sync.Pool{New: func() any { b := make([]byte, outputChunk); return &b }}

type execStream = grpc.BidiStreamingServer[agentpb.ExecRequest, agentpb.ExecResponse]

// execSender serialises Sends on one stream and refuses output after exit.
type execSender struct {
	mu     sync.Mutex
	stream execStream
	closed bool
	failed bool
}

func (s *execSender) send(r *agentpb.ExecResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.failed {
		return
	}
	if err := s.stream.Send(r); err != nil {
		s.failed = true
	}
}

// exit sends the final message; nothing is sent after it.
func (s *execSender) exit(e *agentpb.ExecExit) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return s.stream.Send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Exit{Exit: e}})
}

// Exec runs one process and streams its output.
func (s *Server) Exec(stream execStream) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return status.Error(codes.InvalidArgument, "the first Exec message must be start")
	}
	out := &execSender{stream: stream}
	p, begin, err := s.start(start)
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		return out.exit(&agentpb.ExecExit{ExitCode: startCode(err), Error: err.Error()})
	}
	defer p.closeAll()
	out.send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Started{Started: &agentpb.ExecStarted{Pid: int32(p.pid)}}})

	// Requests after start: stdin, close_stdin, signal, resize.
	done := make(chan struct{})
	defer close(done)
	go s.execControl(stream, p, done)

	exit, err := s.supervise(stream.Context(), p, start, begin, func(stderr bool, b []byte) {
		var m agentpb.ExecResponse
		if stderr {
			m.Msg = &agentpb.ExecResponse_Stderr{Stderr: b}
		} else {
			m.Msg = &agentpb.ExecResponse_Stdout{Stdout: b}
		}
		out.send(&m) // blocks while the host reads slowly
	})
	if err != nil {
		return err
	}
	return out.exit(exit)
}

// start validates a start request and starts its process. An error that
// is a gRPC status is the request's fault; any other error is the
// command's (bad directory, no such program) and goes into its exit.
func (s *Server) start(start *agentpb.ExecStart) (*process, time.Time, error) {
	argv := start.GetArgv()
	if start.GetShell() != "" {
		argv = []string{"/bin/sh", "-c", start.GetShell()}
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, time.Time{}, status.Error(codes.InvalidArgument, "exec needs argv or shell")
	}
	id, dir, err := s.identity(start)
	if err != nil {
		return nil, time.Time{}, err
	}
	env, err := s.buildEnv(start, id)
	if err != nil {
		return nil, time.Time{}, err
	}
	begin := time.Now()
	p, err := s.startProcess(argv, env, dir, id, start)
	if err != nil {
		s.log.Debug("exec failed to start", "argv", argv, "err", err)
		return nil, begin, err
	}
	s.log.Debug("exec started", "pid", p.pid, "argv", argv)
	return p, begin, nil
}

// supervise runs a started process to its end: it hands each chunk of
// output to sink (which may block; the chunk is reused once it returns),
// enforces the timeout, and kills the process group when ctx ends.
func (s *Server) supervise(ctx context.Context, p *process, start *agentpb.ExecStart, begin time.Time, sink func(stderr bool, b []byte)) (*agentpb.ExecExit, error) {
	var readers sync.WaitGroup
	var progress atomic.Int64 // chunks read and handed on
	var sending atomic.Int32  // readers blocked in sink
	for _, o := range p.outputs {
		readers.Add(1)
		go func(f *os.File, stderr bool) {
			defer readers.Done()
			bp := outputBufs.Get().(*[]byte)
			defer outputBufs.Put(bp)
			buf := *bp
			var r io.Reader = f
			if raw := newRawIO(f); raw != nil {
				r = raw // see rawIO
			}
			for {
				n, err := r.Read(buf)
				if n > 0 {
					sending.Add(1)
					sink(stderr, buf[:n])
					sending.Add(-1)
					progress.Add(1)
				}
				if err != nil {
					return
				}
			}
		}(o.f, o.stderr)
	}
	outDone := make(chan struct{})
	go func() { readers.Wait(); close(outDone) }()

	var timeout <-chan time.Time
	if ms := start.GetTimeoutMs(); ms > 0 {
		t := time.NewTimer(time.Duration(ms) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	timedOut := false
	var ws syscall.WaitStatus
wait:
	for {
		select {
		case ws = <-p.wait:
			break wait
		case <-timeout:
			timedOut = true
			timeout = nil
			p.kill(syscall.SIGKILL)
		case <-ctx.Done():
			p.kill(syscall.SIGKILL)
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	elapsed := time.Since(begin)
	p.closeStdin()
	if waitOutput(ctx, outDone, timeout, &progress, &sending, p.unread) {
		// Background children kept writing until the timeout: the
		// timeout bounds the command's output too. Those of its process
		// group are killed; others die writing to the closed pipes.
		timedOut = true
		p.kill(syscall.SIGKILL)
	}
	p.closeOutputs() // unblocks readers still waiting on a background child
	exit := &agentpb.ExecExit{TimedOut: timedOut, DurationNs: elapsed.Nanoseconds()}
	switch {
	case ws.Exited():
		exit.ExitCode = int32(ws.ExitStatus())
	case ws.Signaled():
		exit.ExitCode = -1
		exit.Signal = int32(ws.Signal())
	default:
		exit.ExitCode = -1
	}
	s.log.Debug("exec exited", "pid", p.pid, "code", exit.ExitCode, "signal", exit.Signal, "timed_out", timedOut)
	return exit, nil
}

// waitOutput waits, after the process exited, until its output is all
// sent (the pipes reached EOF), or until the readers have been idle for
// pipeGrace: blocked reading pipes that a background child keeps open, not
// sending. Output the process wrote before it exited is not cut however
// slowly the host reads it, nor however late a reader gets to it (unread
// says the pipes still hold bytes: a reader not scheduled for a while, on
// a busy or stalled vCPU, is not idle). It gives up when timeout fires,
// and then returns true.
func waitOutput(ctx context.Context, done <-chan struct{}, timeout <-chan time.Time, progress *atomic.Int64, sending *atomic.Int32, unread func() bool) bool {
	t := time.NewTicker(pipeGrace / 4)
	defer t.Stop()
	last, idleSince := progress.Load(), time.Now()
	for {
		select {
		case <-done:
			return false
		case <-ctx.Done():
			return false
		case <-timeout:
			return true
		case now := <-t.C:
			if p := progress.Load(); p != last || sending.Load() > 0 || unread() {
				last, idleSince = p, now
				continue
			}
			if now.Sub(idleSince) >= pipeGrace {
				return false
			}
		}
	}
}

// execControl handles the requests that follow start until the stream ends.
func (s *Server) execControl(stream execStream, p *process, done <-chan struct{}) {
	stdin := make(chan []byte, stdinQueue)
	go p.feedStdin(stdin)
	stdinOpen := true
	closeStdin := func() {
		if stdinOpen {
			stdinOpen = false
			close(stdin)
		}
	}
	defer closeStdin()
	for {
		req, err := stream.Recv()
		if err != nil {
			return // io.EOF: the host sent everything, so stdin ends too
		}
		switch m := req.GetMsg().(type) {
		case *agentpb.ExecRequest_Stdin:
			if !stdinOpen {
				continue
			}
			select {
			case stdin <- m.Stdin:
			case <-done:
				return
			}
		case *agentpb.ExecRequest_CloseStdin:
			if m.CloseStdin {
				closeStdin()
			}
		case *agentpb.ExecRequest_Signal:
			if sig, ok := signalOf(m.Signal); ok {
				p.kill(sig)
			}
		case *agentpb.ExecRequest_Resize:
			if p.pty != nil && m.Resize != nil {
				if err := setWinsize(p.pty, m.Resize); err != nil {
					s.log.Debug("resize failed", "pid", p.pid, "err", err)
				}
			}
		}
	}
}
