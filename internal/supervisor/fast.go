package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// fastLane is the host end of the agent's fast lane (package lane): one
// client, dialed when the machine starts and again on the first use after
// it ended (a snapshot hangs up on it; a lost channel ends it).
type fastLane struct {
	dial func(context.Context) (net.Conn, error)

	mu     sync.Mutex
	client *lane.Client
	closed bool
}

// errLaneShut: the machine stopped, and its lane with it, for good.
var errLaneShut = errors.New("fast lane: the machine has stopped")

// get returns the lane's client, dialing when there is none that works.
func (f *fastLane) get(ctx context.Context) (*lane.Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errLaneShut
	}
	if f.client != nil && f.client.Err() == nil {
		return f.client, nil
	}
	conn, err := f.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("dial fast lane: %w", err)
	}
	f.client = lane.NewClient(conn)
	return f.client, nil
}

// current returns the client in use, if any, without dialing.
func (f *fastLane) current() *lane.Client {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.client
}

// hangUp closes the current connection; the next get dials again.
func (f *fastLane) hangUp() {
	f.mu.Lock()
	c := f.client
	f.client = nil
	f.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
}

// close hangs up for good.
func (f *fastLane) close() {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.hangUp()
}

// Lane returns the client of the agent's fast lane (ping, and a command
// run without stdin), which costs the guest far less per call than the
// gRPC channel.
func (s *Supervisor) Lane(ctx context.Context) (*lane.Client, error) {
	if s.fast == nil {
		return nil, errors.New("fast lane: the machine has not started")
	}
	return s.fast.get(ctx)
}

// callLane makes one call on the fast lane, dialing again while the lane
// cannot be reached yet: over vsock the guest refuses connections until
// its agent listens (over virtio-serial QEMU holds the call until the
// guest opens its port).
func (s *Supervisor) callLane(ctx context.Context, typ uint8, req, resp proto.Message) error {
	for {
		l, err := s.Lane(ctx)
		if err == nil {
			if err = l.Unary(ctx, typ, req, resp); err == nil || !errors.Is(err, lane.ErrClosed) {
				return err
			}
		}
		if errors.Is(err, errLaneShut) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// LaneDialedEarly reports whether the restored machine's first call went
// over a fast lane connected before the guest resumed (as it should under
// QEMU with virtio-serial; a lane dialed later works, a restore later).
func (s *Supervisor) LaneDialedEarly() bool { return s.laneEarly }

// Prime makes, ahead of a warm snapshot, the call every clone of it starts
// with: a refresh over the fast lane. The guest's lazily built state for
// it (the agent's protobuf message tables, buffers, the files it opens)
// is then part of the snapshot, and no clone builds it again under
// emulation. (Translated code is never part of a snapshot.)
func (s *Supervisor) Prime(ctx context.Context) error { return s.refresh(ctx) }

// refresh makes the guest a machine of its own (refreshRequest), over the
// fast lane: a restored guest's first call.
func (s *Supervisor) refresh(ctx context.Context) error {
	req, err := refreshRequest(s.spec.Hostname)
	if err != nil {
		return err
	}
	if err := s.callLane(ctx, lane.TypeRefresh, req, &agentpb.RefreshResponse{}); err != nil {
		return fmt.Errorf("refresh restored guest: %w", err)
	}
	return nil
}

// warmUpDelay is how long after a restore the warm-up waits for the
// caller's own first command, which would warm the same paths.
const warmUpDelay = 250 * time.Millisecond

// warmUpSoon runs one command, `true`, over the fast lane, delay after a
// restored guest answered, unless a command started on the lane first.
// Under emulation (TCG) a restored QEMU has translated none of the guest's
// code, and translated code is never part of a snapshot: the first command
// after a restore paid for translating the agent's lane and exec paths,
// the kernel's fork, exec, cgroup and exit paths and the program, 120–190
// ms of QEMU's CPU where the next took 30–50 (measured on a 2-core host
// under load). Run while the VM idles, that cost is off the caller's path.
// A snapshot hangs the lane up, which ends a warm-up in flight.
func (s *Supervisor) warmUpSoon(delay time.Duration) {
	l := s.fast.current()
	if l == nil {
		return
	}
	seen := l.Runs()
	afterFunc(delay, func() {
		if s.fast.current() != l || l.Runs() != seen || s.Paused() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := warmUp(ctx, l); err != nil {
			s.log.Debug("warm-up after restore", "err", err)
		}
	})
}

// afterFunc is time.AfterFunc; tests fire the warm-up themselves.
var afterFunc = func(d time.Duration, f func()) { time.AfterFunc(d, f) }

// warmUp runs `true` as a caller's streamed command would go, and waits
// for its end.
func warmUp(ctx context.Context, l *lane.Client) error {
	start := &agentpb.ExecStart{Argv: []string{"true"}, RunId: lane.NewRunID(), Stream: true, TimeoutMs: 30_000}
	call, err := l.Start(ctx, lane.TypeRun, start)
	if err != nil {
		return err
	}
	defer call.End()
	for {
		m, err := call.RecvRun(ctx)
		if err != nil {
			if ctx.Err() != nil {
				l.Stop(ctx, start.RunId)
			}
			return err
		}
		if m.GetExit() != nil {
			return nil
		}
	}
}
