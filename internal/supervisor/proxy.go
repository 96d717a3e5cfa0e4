package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// agentMethodPrefix is the gRPC method prefix of the guest agent's service.
const agentMethodPrefix = "/smolvm.agent.v1.Agent/"

// frame is a message the proxy forwards without decoding it.
type frame struct{ b []byte }

// codec passes frames through untouched and encodes everything else as
// protobuf, so the supervisor's own services and the agent proxy share one
// server.
type codec struct{}

var _ encoding.Codec = codec{}

func (codec) Marshal(v any) ([]byte, error) {
	if f, ok := v.(*frame); ok {
		return f.b, nil
	}
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("codec: cannot marshal %T", v)
	}
	return proto.Marshal(m)
}

func (codec) Unmarshal(data []byte, v any) error {
	if f, ok := v.(*frame); ok {
		f.b = append([]byte(nil), data...)
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("codec: cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(data, m)
}

func (codec) Name() string { return "proto" }

// proxy forwards one call of the agent's service to the guest, message by
// message in both directions, keeping the guest's status codes.
func (s *Supervisor) proxy(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok || !strings.HasPrefix(method, agentMethodPrefix) {
		return status.Errorf(codes.Unimplemented, "unknown method %q", method)
	}
	if s.Paused() {
		return s.errPaused()
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	var first *frame // read already, to see whether the lane can take it
	if method == execMethod {
		first = new(frame)
		if err := ss.RecvMsg(first); err != nil {
			return err
		}
		if start := laneExecStart(first); start != nil {
			if l, err := s.Lane(ctx); err == nil {
				err := s.execOverLane(ctx, ss, l, start)
				if !errors.Is(err, lane.ErrNotSent) {
					return err
				}
				s.log.Debug("fast lane failed, proxying exec over gRPC", "err", err)
			}
		}
	}
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	s.mu.Lock()
	conn := s.agentConn
	s.mu.Unlock()
	cs, err := conn.NewStream(ctx, desc, method, grpc.ForceCodec(codec{}))
	if err != nil {
		return err
	}
	if first != nil {
		if err := cs.SendMsg(first); err != nil {
			return err
		}
	}
	go func() {
		for {
			var f frame
			if err := ss.RecvMsg(&f); err != nil {
				if errors.Is(err, io.EOF) {
					_ = cs.CloseSend()
				} else {
					cancel()
				}
				return
			}
			if err := cs.SendMsg(&f); err != nil {
				return
			}
		}
	}()
	for {
		var f frame
		if err := cs.RecvMsg(&f); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(&f); err != nil {
			return err
		}
	}
}

// execMethod is the agent's Exec, which the proxy runs over the fast lane
// when it can: a command without stdin or terminal.
const execMethod = agentMethodPrefix + "Exec"

// laneExecStart returns the start of an Exec that the fast lane can run
// (no stdin, no terminal), or nil.
func laneExecStart(f *frame) *agentpb.ExecStart {
	var req agentpb.ExecRequest
	if proto.Unmarshal(f.b, &req) != nil {
		return nil
	}
	start := req.GetStart()
	if start == nil || start.GetStdin() || start.GetTty() {
		return nil
	}
	return start
}

// execOverLane runs an Exec call from api.sock as a streamed run on the
// fast lane: the guest does less for it than for a gRPC stream, which
// under emulation is most of a command's cost. The client sees the Exec
// messages it would have had from the agent; its signals go as the lane's
// cancel calls, and each piece of output is acknowledged to the guest once
// the client's stream has taken it, so a client that stops reading holds
// up its own command, not the lane.
func (s *Supervisor) execOverLane(ctx context.Context, ss grpc.ServerStream, l *lane.Client, start *agentpb.ExecStart) error {
	start = proto.Clone(start).(*agentpb.ExecStart)
	start.RunId, start.Stream = lane.NewRunID(), true
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call, err := l.Start(ctx, lane.TypeRun, start)
	if err != nil {
		return err // lane.ErrNotSent
	}
	defer call.End()
	s.log.Debug("exec over the fast lane", "run", start.RunId)
	go func() {
		for {
			var req agentpb.ExecRequest
			if err := ss.RecvMsg(&req); err != nil {
				if !errors.Is(err, io.EOF) {
					cancel() // the client is gone
				}
				return
			}
			if sig := req.GetSignal(); sig > 0 && sig < 65 {
				_ = l.Signal(ctx, start.RunId, syscall.Signal(sig))
			}
		}
	}()
	send := func(r *agentpb.ExecResponse) error {
		if err := ss.SendMsg(r); err != nil {
			cancel()
			return err
		}
		return nil
	}
	started := false
	for {
		m, err := call.RecvRun(ctx)
		if err != nil {
			if ctx.Err() != nil {
				l.Stop(ctx, start.RunId)
				return status.FromContextError(ctx.Err()).Err()
			}
			if errors.Is(err, lane.ErrClosed) {
				return status.Error(codes.Unavailable, err.Error())
			}
			return status.Error(codes.InvalidArgument, err.Error()) // the guest refused the run
		}
		if !started && (m.Exit == nil || m.Exit.Error == "") {
			// An agent that does not stream (an older one) sends no
			// started message: the client gets one without a pid.
			st := m.Started
			if st == nil {
				st = &agentpb.ExecStarted{}
			}
			started = true
			if err := send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Started{Started: st}}); err != nil {
				l.Stop(ctx, start.RunId)
				return err
			}
		}
		for i, b := range [][]byte{m.Stdout, m.Stderr} {
			if len(b) == 0 {
				continue
			}
			r := &agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Stdout{Stdout: b}}
			if i == 1 {
				r = &agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Stderr{Stderr: b}}
			}
			if err := send(r); err != nil {
				l.Stop(ctx, start.RunId)
				return err
			}
			_ = l.Ack(ctx, start.RunId, int64(len(b)))
		}
		if m.Exit != nil {
			return send(&agentpb.ExecResponse{Msg: &agentpb.ExecResponse_Exit{Exit: m.Exit}})
		}
	}
}
