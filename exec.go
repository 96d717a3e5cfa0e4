package smolvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Cmd is a command to run in a VM, shaped like os/exec.Cmd.
type Cmd struct {
	// Path is the program; it is looked up in the guest's PATH.
	Path string
	// Args holds the command line, Args[0] included.
	Args []string
	// Shell, when set, runs through /bin/sh -c instead of Path and Args.
	Shell string
	// Env entries (KEY=VALUE) are added over the sandbox environment.
	Env []string
	// Dir is the working directory in the guest (default: the image's
	// WorkingDir, else the user's home, /root for root).
	Dir string
	// User runs the command as this guest user: a name, a uid, name:group
	// or uid:gid (default: the image's User, else root).
	User string
	// Stdin, Stdout and Stderr work as in os/exec; nil Stdout or Stderr
	// discard the output, nil Stdin reads from /dev/null.
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Timeout kills the whole process group in the guest; 0 means none.
	Timeout time.Duration
	// TTY runs the command on a pseudo-terminal (stderr is merged into
	// stdout); Rows and Cols set its first size.
	TTY        bool
	Rows, Cols uint16

	// Process is set by Start.
	Process *Process
	// ProcessState is set by Wait.
	ProcessState *ProcessState

	vm      *VM
	ctx     context.Context
	cancel  context.CancelFunc
	unbound context.CancelFunc // ends the bound of Timeout on ctx
	stream  agentpb.Agent_ExecClient
	lane    *laneCmd // set when the command runs over the fast lane
	sendMu  sync.Mutex
	done    chan struct{}
	err     error
}

// Process is a started command in the guest.
type Process struct {
	Pid int
	cmd *Cmd
}

// ProcessState is how a command ended.
type ProcessState struct {
	ExitCode int // -1 when killed by a signal
	Signal   syscall.Signal
	TimedOut bool
	Duration time.Duration
}

// Success reports whether the command exited with status 0.
func (p *ProcessState) Success() bool { return p.ExitCode == 0 }

// StartError is a command that could not be started in the VM: it does not
// exist, cannot be executed, or its working directory is missing.
type StartError struct {
	Command string // the command line
	Reason  string // what the guest agent said
	// ExitCode is what a shell would exit with: 127 when the command does
	// not exist, 126 when it cannot run (permissions, not a program), or
	// -1 for other causes (and from agents older than this field's use).
	ExitCode int
}

func (e *StartError) Error() string { return fmt.Sprintf("exec %q: %s", e.Command, e.Reason) }

// startError makes the error of a command the agent could not start.
func startError(command string, e *agentpb.ExecExit) error {
	return &StartError{Command: command, Reason: e.Error, ExitCode: int(e.ExitCode)}
}

// ExitError is returned by Wait and Run for a command that did not exit 0.
type ExitError struct {
	*ProcessState
	// Stderr holds the start of the standard error output when Output
	// collected it.
	Stderr []byte
}

func (e *ExitError) Error() string {
	switch {
	case e.TimedOut:
		return "command timed out and was killed"
	case e.Signal != 0:
		return "signal: " + e.Signal.String()
	}
	return fmt.Sprintf("exit status %d", e.ExitCode)
}

// Command returns a Cmd that runs name with args in the VM.
func (vm *VM) Command(ctx context.Context, name string, args ...string) *Cmd {
	return &Cmd{Path: name, Args: append([]string{name}, args...), vm: vm, ctx: ctx}
}

// ShellCommand returns a Cmd that runs script with /bin/sh -c.
func (vm *VM) ShellCommand(ctx context.Context, script string) *Cmd {
	return &Cmd{Shell: script, vm: vm, ctx: ctx}
}

// String is a human-readable form of the command.
func (c *Cmd) String() string {
	if c.Shell != "" {
		return c.Shell
	}
	return strings.Join(c.Args, " ")
}

// Start starts the command and returns once the guest process exists.
func (c *Cmd) Start() error {
	if c.Process != nil {
		return errors.New("smolvm: command already started")
	}
	if c.ctx == nil {
		c.ctx = context.Background()
	}
	if c.Timeout > 0 {
		c.ctx, c.unbound = boundByTimeout(c.ctx, c.Timeout)
	}
	if err := c.start(); err != nil {
		err = c.timedOut(err)
		c.unbind()
		return err
	}
	return nil
}

// timeoutGrace is how long after a command's timeout the host stops
// waiting for the guest to report it: the guest kills the command at
// Timeout, and a guest that cannot (paused, its supervisor stopped) does
// not hold the caller longer than this.
const timeoutGrace = 2 * time.Second

// errHostTimeout is the cause of a context that boundByTimeout ended.
var errHostTimeout = errors.New("command timed out")

// boundByTimeout bounds a command's whole call, connection included, to
// its timeout and timeoutGrace.
func boundByTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, d+timeoutGrace, errHostTimeout)
}

// hostTimedOut tells whether ctx ended by boundByTimeout.
func hostTimedOut(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), errHostTimeout)
}

// timedOut turns the error of a call that the command's timeout ended on
// the host into the command's timeout (an *ExitError, as when the guest
// kills it); other errors, and the guest's own reports, stay.
func (c *Cmd) timedOut(err error) error {
	var ee *ExitError
	var se *StartError
	if err == nil || errors.As(err, &ee) || errors.As(err, &se) || !hostTimedOut(c.ctx) {
		return err
	}
	if c.Process == nil {
		// It never started: say why, not that it was killed.
		return c.vm.noAnswer(fmt.Sprintf("exec %q", c.String()), c.Timeout)
	}
	c.ProcessState = &ProcessState{ExitCode: -1, TimedOut: true, Duration: c.Timeout + timeoutGrace}
	return &ExitError{ProcessState: c.ProcessState}
}

func (c *Cmd) unbind() {
	if c.unbound != nil {
		c.unbound()
	}
}

func (c *Cmd) start() error {
	if c.Stdin == nil && !c.TTY {
		if l := c.vm.lane(c.ctx); l != nil {
			err := c.startLane(l) // exec_lane.go
			if !errors.Is(err, lane.ErrNotSent) {
				return err
			}
			c.vm.log.Debug("fast lane failed, using gRPC", "err", err)
		}
	}
	a, err := c.vm.agentClient(c.ctx)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(c.ctx)
	c.cancel = cancel
	stream, err := a.Exec(ctx)
	if err != nil {
		cancel()
		return c.vm.callErr(c.ctx, "exec", err)
	}
	c.stream = stream
	start := c.execStart()
	if c.TTY {
		start.Size = &agentpb.WindowSize{Rows: uint32(c.Rows), Cols: uint32(c.Cols)}
	}
	if err := c.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: start}}); err != nil {
		cancel()
		return c.vm.callErr(c.ctx, "exec", err)
	}
	first, err := stream.Recv()
	if err != nil {
		cancel()
		return c.vm.callErr(c.ctx, "exec", err)
	}
	switch m := first.Msg.(type) {
	case *agentpb.ExecResponse_Started:
		c.Process = &Process{Pid: int(m.Started.Pid), cmd: c}
	case *agentpb.ExecResponse_Exit:
		cancel()
		if m.Exit.Error != "" {
			return startError(c.String(), m.Exit)
		}
		return fmt.Errorf("exec %q: ended before it started", c.String())
	default:
		cancel()
		return fmt.Errorf("exec %q: protocol error: unexpected first message %T", c.String(), m)
	}
	c.done = make(chan struct{})
	if c.Stdin != nil {
		go c.copyStdin()
	}
	go c.receive()
	return nil
}

// execStart describes the command for the agent.
func (c *Cmd) execStart() *agentpb.ExecStart {
	start := &agentpb.ExecStart{Shell: c.Shell, Env: c.Env, Dir: c.Dir, User: c.User, Tty: c.TTY, Stdin: c.Stdin != nil,
		TimeoutMs: timeoutMs(c.Timeout)}
	if c.Shell == "" {
		start.Argv = c.Args
		if len(start.Argv) == 0 {
			start.Argv = []string{c.Path}
		}
	}
	return start
}

func (c *Cmd) send(req *agentpb.ExecRequest) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	return c.stream.Send(req)
}

func (c *Cmd) copyStdin() {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Stdin.Read(buf)
		if n > 0 {
			if c.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Stdin{Stdin: append([]byte(nil), buf[:n]...)}}) != nil {
				return
			}
		}
		if err != nil {
			_ = c.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_CloseStdin{CloseStdin: true}})
			return
		}
	}
}

func (c *Cmd) receive() {
	defer close(c.done)
	defer c.cancel()
	for {
		resp, err := c.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("agent closed the stream without an exit status")
			}
			c.err = c.vm.callErr(c.ctx, "exec", err)
			return
		}
		switch m := resp.Msg.(type) {
		case *agentpb.ExecResponse_Stdout:
			if c.Stdout != nil {
				_, _ = c.Stdout.Write(m.Stdout)
			}
		case *agentpb.ExecResponse_Stderr:
			if c.Stderr != nil {
				_, _ = c.Stderr.Write(m.Stderr)
			}
		case *agentpb.ExecResponse_Exit:
			c.exited(m.Exit)
			return
		}
	}
}

// exited records the agent's exit report as the command's end: its state,
// and an *ExitError unless it exited 0.
func (c *Cmd) exited(e *agentpb.ExecExit) {
	c.ProcessState, c.err = processState(c.String(), e)
	if c.err == nil && !c.ProcessState.Success() {
		c.err = &ExitError{ProcessState: c.ProcessState}
	}
}

// processState reads the agent's exit report of a command; a command that
// could not start is an error.
func processState(command string, e *agentpb.ExecExit) (*ProcessState, error) {
	if e.Error != "" {
		return nil, startError(command, e)
	}
	return &ProcessState{ExitCode: int(e.ExitCode), Signal: syscall.Signal(e.Signal),
		TimedOut: e.TimedOut, Duration: time.Duration(e.DurationNs)}, nil
}

// timeoutMs is a command's timeout for the agent: 0 is none, so a timeout
// under a millisecond counts as one.
func timeoutMs(d time.Duration) int64 {
	if d > 0 && d < time.Millisecond {
		return 1
	}
	return d.Milliseconds()
}

// Wait waits for the command to exit and its output to be copied.
func (c *Cmd) Wait() error {
	if c.Process == nil {
		return errors.New("smolvm: command not started")
	}
	<-c.done
	c.err = c.timedOut(c.err)
	c.unbind()
	return c.err
}

// Run starts the command and waits for it.
func (c *Cmd) Run() error {
	if err := c.Start(); err != nil {
		return err
	}
	return c.Wait()
}

// Output runs the command and returns its standard output.
func (c *Cmd) Output() ([]byte, error) {
	if c.Stdout != nil {
		return nil, errors.New("smolvm: Stdout already set")
	}
	var out bytes.Buffer
	c.Stdout = &out
	var errb *capWriter
	if c.Stderr == nil {
		errb = &capWriter{max: 64 << 10}
		c.Stderr = errb
	}
	err := c.Run()
	var ee *ExitError
	if errb != nil && errors.As(err, &ee) {
		ee.Stderr = errb.buf.Bytes()
	}
	return out.Bytes(), err
}

// CombinedOutput runs the command and returns stdout and stderr together.
func (c *Cmd) CombinedOutput() ([]byte, error) {
	if c.Stdout != nil || c.Stderr != nil {
		return nil, errors.New("smolvm: Stdout or Stderr already set")
	}
	var out syncBuffer
	c.Stdout, c.Stderr = &out, &out
	err := c.Run()
	return out.Bytes(), err
}

// Signal sends a signal to the command's process group in the guest.
func (p *Process) Signal(sig syscall.Signal) error {
	if lc := p.cmd.lane; lc != nil {
		return lc.l.Signal(p.cmd.ctx, lc.runID, sig)
	}
	return p.cmd.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Signal{Signal: int32(sig)}})
}

// Kill sends SIGKILL to the command's process group.
func (p *Process) Kill() error { return p.Signal(syscall.SIGKILL) }

// Resize changes the terminal size of a TTY command.
func (c *Cmd) Resize(rows, cols uint16) error {
	if c.lane != nil {
		return nil // no terminal to resize
	}
	return c.send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Resize{Resize: &agentpb.WindowSize{Rows: uint32(rows), Cols: uint32(cols)}}})
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Bytes()
}

// capWriter keeps the first max bytes and counts the rest.
type capWriter struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - w.buf.Len(); room < len(p) {
		w.truncated = true
		if room > 0 {
			w.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return w.buf.Write(p)
}
