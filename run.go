package smolvm

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// DefaultOutputLimit is how much of each output stream Run keeps.
const DefaultOutputLimit = 16 << 20

// Result is the outcome of Run.
type Result struct {
	ExitCode int
	Signal   int
	TimedOut bool
	Stdout   []byte
	Stderr   []byte
	// Truncated is set when an output passed the limit and was cut.
	Truncated bool
	Duration  time.Duration
}

// RunOption changes how Run runs a command.
type RunOption func(*runOptions)

type runOptions struct {
	env     []string
	dir     string
	user    string
	timeout time.Duration
	stdin   io.Reader
	limit   int
}

// WithEnv adds KEY=VALUE entries to the command's environment.
func WithEnv(kv ...string) RunOption { return func(o *runOptions) { o.env = append(o.env, kv...) } }

// WithDir sets the working directory in the guest.
func WithDir(dir string) RunOption { return func(o *runOptions) { o.dir = dir } }

// WithUser runs the command as a guest user: a name, a uid, name:group or
// uid:gid, resolved in the guest (default: the image's User, else root).
func WithUser(user string) RunOption { return func(o *runOptions) { o.user = user } }

// WithTimeout kills the command's whole process group after d.
func WithTimeout(d time.Duration) RunOption { return func(o *runOptions) { o.timeout = d } }

// WithStdin feeds r to the command's standard input.
func WithStdin(r io.Reader) RunOption { return func(o *runOptions) { o.stdin = r } }

// WithOutputLimit caps how many bytes of stdout and of stderr are kept.
func WithOutputLimit(n int) RunOption { return func(o *runOptions) { o.limit = n } }

// Run runs a shell command (/bin/sh -c) and collects its output. A
// non-zero exit is not an error: it is in Result.ExitCode. Errors are for
// commands that could not run (VM stopped, bad directory, channel lost).
func (vm *VM) Run(ctx context.Context, command string, opts ...RunOption) (*Result, error) {
	o := runOptions{limit: DefaultOutputLimit}
	for _, f := range opts {
		f(&o)
	}
	stdout, stderr := &capWriter{max: o.limit}, &capWriter{max: o.limit}
	if o.stdin == nil {
		if l := vm.lane(ctx); l != nil {
			fctx := ctx
			if o.timeout > 0 {
				var cancel context.CancelFunc
				fctx, cancel = boundByTimeout(ctx, o.timeout) // exec.go
				defer cancel()
			}
			res, err := vm.runFast(fctx, l, command, o, stdout, stderr)
			if err != nil && hostTimedOut(fctx) && !errors.As(err, new(*StartError)) {
				ps := &ProcessState{ExitCode: -1, TimedOut: true, Duration: o.timeout + timeoutGrace}
				return result(ps, stdout, stderr, false), nil
			}
			if !errors.Is(err, lane.ErrNotSent) {
				return res, err
			}
			// The lane broke before the command went out: gRPC runs it.
			vm.log.Debug("fast lane failed, using gRPC", "err", err)
		}
	}
	c := vm.ShellCommand(ctx, command)
	c.Env, c.Dir, c.User, c.Timeout, c.Stdin = o.env, o.dir, o.user, o.timeout, o.stdin
	c.Stdout, c.Stderr = stdout, stderr
	err := c.Run()
	var ee *ExitError
	if err != nil && !errors.As(err, &ee) {
		return nil, err
	}
	return result(c.ProcessState, stdout, stderr, false), nil
}

// result is Run's outcome from a command's end and its kept output.
func result(ps *ProcessState, stdout, stderr *capWriter, truncated bool) *Result {
	return &Result{ExitCode: ps.ExitCode, Signal: int(ps.Signal), TimedOut: ps.TimedOut,
		Stdout: stdout.buf.Bytes(), Stderr: stderr.buf.Bytes(), Truncated: truncated || stdout.truncated || stderr.truncated,
		Duration: ps.Duration}
}

// runFast runs a command without stdin over the agent's fast lane: one
// request, and for a command that prints little one reply.
func (vm *VM) runFast(ctx context.Context, l *lane.Client, command string, o runOptions, stdout, stderr *capWriter) (*Result, error) {
	start := &agentpb.ExecStart{Shell: command, Env: o.env, Dir: o.dir, User: o.user, RunId: lane.NewRunID(),
		OutputLimit: int64(max(o.limit, 0)), TimeoutMs: timeoutMs(o.timeout)}
	call, err := l.Start(ctx, lane.TypeRun, start)
	if err != nil {
		return nil, err // lane.ErrNotSent
	}
	defer call.End()
	truncated := false // by the agent
	for {
		m, err := call.RecvRun(ctx)
		if err != nil {
			if ctx.Err() != nil {
				l.Stop(ctx, start.RunId) // the lane has no cancellation of its own
			}
			return nil, vm.callErr(ctx, "exec", err)
		}
		// The agent keeps to the limit; the host does not count on it.
		_, _ = stdout.Write(m.Stdout)
		_, _ = stderr.Write(m.Stderr)
		truncated = truncated || m.Truncated
		if m.Exit != nil {
			ps, err := processState(command, m.Exit)
			if err != nil {
				return nil, err
			}
			return result(ps, stdout, stderr, truncated), nil
		}
	}
}
