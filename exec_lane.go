package smolvm

import (
	"context"
	"io"
	"sync"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// A Cmd without stdin and without a terminal runs over the agent's fast
// lane when the VM belongs to this process: a streamed run (its process
// named first, then its output as the guest reads it). Under emulation
// that costs the guest far less than a gRPC stream, the more so for a
// restored VM's first command, when the gRPC connection is not set up yet
// and everything it runs is translated anew.

// laneCmd is the fast-lane half of a Cmd.
type laneCmd struct {
	l     *lane.Client
	runID uint64
}

// startLane starts c over l. An error wrapping lane.ErrNotSent means the
// guest never saw the call, and gRPC may run it instead.
func (c *Cmd) startLane(l *lane.Client) error {
	start := c.execStart()
	start.RunId, start.Stream = lane.NewRunID(), true
	ctx, cancel := context.WithCancel(c.ctx)
	call, err := l.Start(ctx, lane.TypeRun, start)
	if err != nil {
		cancel()
		return err // lane.ErrNotSent
	}
	lc := &laneCmd{l: l, runID: start.RunId}
	m, err := call.RecvRun(ctx)
	if err != nil {
		call.End()
		l.Stop(c.ctx, lc.runID)
		cancel()
		return c.vm.callErr(c.ctx, "exec", err)
	}
	if m.Exit != nil && m.Exit.Error != "" {
		call.End()
		cancel()
		return startError(c.String(), m.Exit)
	}
	c.Process = &Process{Pid: int(m.Started.GetPid()), cmd: c}
	var first *agentpb.RunOutput // output to copy before reading more
	if m.Started == nil {
		first = m // an agent that does not stream (an older one): no pid
	}
	c.lane, c.cancel = lc, cancel
	c.done = make(chan struct{})
	go c.receiveLane(ctx, call, first)
	return nil
}

// receiveLane copies the run's output to Stdout and Stderr (through a
// buffer, so that a slow writer does not hold up the lane's other calls)
// until its exit.
func (c *Cmd) receiveLane(ctx context.Context, call *lane.Call, m *agentpb.RunOutput) {
	defer close(c.done)
	defer c.cancel()
	defer call.End()
	lc := c.lane
	out := newOutputCopier(c.Stdout, c.Stderr, func(n int64) { _ = lc.l.Ack(c.ctx, lc.runID, n) })
	for {
		var err error
		if m == nil {
			m, err = call.RecvRun(ctx)
		}
		if err != nil {
			if ctx.Err() != nil {
				lc.l.Stop(c.ctx, lc.runID) // the lane has no cancellation of its own
			}
			out.close()
			c.err = c.vm.callErr(c.ctx, "exec", err)
			return
		}
		out.add(m.Stdout, m.Stderr)
		if m.Exit != nil {
			out.close()
			c.exited(m.Exit)
			return
		}
		m = nil
	}
}

// maxPendingOutput bounds a streamed run's output waiting for slow
// writers. The guest sends no more than its window (1 MiB) ahead of the
// acknowledgements; one that ignores it holds up, past this much, the
// lane's reader (its own VM's lane calls), never the host's memory.
const maxPendingOutput = 8 << 20

// ackEvery is how much written output is acknowledged at once (and
// whatever is written when nothing else waits).
const ackEvery = 256 << 10

// outputCopier hands output to the Cmd's writers from a goroutine of its
// own, holding up to maxPendingOutput bytes for them, and acknowledges it
// to the guest as it is written.
type outputCopier struct {
	stdout, stderr io.Writer
	ack            func(n int64)
	mu             sync.Mutex
	cond           *sync.Cond
	queue          []outputChunk
	pending        int
	closed         bool
	done           chan struct{}
}

type outputChunk struct {
	b      []byte
	stderr bool
}

func newOutputCopier(stdout, stderr io.Writer, ack func(n int64)) *outputCopier {
	o := &outputCopier{stdout: stdout, stderr: stderr, ack: ack, done: make(chan struct{})}
	o.cond = sync.NewCond(&o.mu)
	go o.run()
	return o
}

func (o *outputCopier) add(stdout, stderr []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for o.pending > maxPendingOutput {
		o.cond.Wait()
	}
	dropped := 0
	for i, b := range [][]byte{stdout, stderr} {
		switch {
		case len(b) == 0:
		case i == 0 && o.stdout != nil || i == 1 && o.stderr != nil:
			o.queue = append(o.queue, outputChunk{b: b, stderr: i == 1})
			o.pending += len(b)
		default:
			dropped += len(b) // no writer: consumed now
		}
	}
	o.cond.Broadcast()
	if dropped > 0 {
		o.mu.Unlock() // not held over a send
		o.ack(int64(dropped))
		o.mu.Lock()
	}
}

// close waits until everything added has been written.
func (o *outputCopier) close() {
	o.mu.Lock()
	o.closed = true
	o.cond.Broadcast()
	o.mu.Unlock()
	<-o.done
}

func (o *outputCopier) run() {
	defer close(o.done)
	o.mu.Lock()
	defer o.mu.Unlock()
	written := 0 // not acknowledged yet
	for {
		if written > 0 && (written >= ackEvery || len(o.queue) == 0) {
			n := written
			written = 0
			o.mu.Unlock() // not held over a send
			o.ack(int64(n))
			o.mu.Lock()
		}
		for len(o.queue) == 0 && !o.closed {
			o.cond.Wait()
		}
		if len(o.queue) == 0 {
			return
		}
		ch := o.queue[0]
		o.queue = o.queue[1:]
		o.mu.Unlock()
		w := o.stdout
		if ch.stderr {
			w = o.stderr
		}
		_, _ = w.Write(ch.b)
		o.mu.Lock()
		written += len(ch.b)
		o.pending -= len(ch.b)
		o.cond.Broadcast()
	}
}
