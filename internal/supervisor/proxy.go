package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
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
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	s.mu.Lock()
	conn := s.agentConn
	s.mu.Unlock()
	cs, err := conn.NewStream(ctx, desc, method, grpc.ForceCodec(codec{}))
	if err != nil {
		return err
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
