package smolvm

import (
	"context"
	"errors"
	"io"
	"time"
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
	timeout time.Duration
	stdin   io.Reader
	limit   int
}

// WithEnv adds KEY=VALUE entries to the command's environment.
func WithEnv(kv ...string) RunOption { return func(o *runOptions) { o.env = append(o.env, kv...) } }

// WithDir sets the working directory in the guest.
func WithDir(dir string) RunOption { return func(o *runOptions) { o.dir = dir } }

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
	c := vm.ShellCommand(ctx, command)
	c.Env, c.Dir, c.Timeout, c.Stdin = o.env, o.dir, o.timeout, o.stdin
	c.Stdout, c.Stderr = stdout, stderr
	err := c.Run()
	var ee *ExitError
	if err != nil && !errors.As(err, &ee) {
		return nil, err
	}
	ps := c.ProcessState
	return &Result{ExitCode: ps.ExitCode, Signal: int(ps.Signal), TimedOut: ps.TimedOut,
		Stdout: stdout.buf.Bytes(), Stderr: stderr.buf.Bytes(), Truncated: stdout.truncated || stderr.truncated,
		Duration: ps.Duration}, nil
}
