package network

import (
	"context"
	"fmt"

	"google.golang.org/grpc"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
)

// Register serves the Network service of a VM's API socket. n is nil for
// a VM without a network (an untyped nil); cfg describes its network then.
func Register(s *grpc.Server, n Forwarder, cfg *Config) {
	controlpb.RegisterNetworkServer(s, &service{n: n, cfg: cfg})
}

type service struct {
	controlpb.UnimplementedNetworkServer
	n   Forwarder
	cfg *Config
}

func (s *service) stack() (Forwarder, error) {
	if s.n == nil {
		mode := ModeNone
		if s.cfg != nil && s.cfg.Mode != "" {
			mode = s.cfg.Mode
		}
		return nil, fmt.Errorf("port forwards need a network (user-mode or tap); this VM's network is %s (create it with --net user or --net tap): %w", mode, errdefs.ErrUnsupported)
	}
	return s.n, nil
}

func toPB(f Forward) *controlpb.PortForward {
	return &controlpb.PortForward{HostIp: f.HostIP, HostPort: int32(f.HostPort), GuestPort: int32(f.GuestPort)}
}

// FromPB converts a wire forward.
func FromPB(p *controlpb.PortForward) Forward {
	if p == nil {
		return Forward{}
	}
	return Forward{HostIP: p.HostIp, HostPort: int(p.HostPort), GuestPort: int(p.GuestPort)}
}

func (s *service) ListPorts(ctx context.Context, _ *controlpb.ListPortsRequest) (*controlpb.ListPortsResponse, error) {
	resp := &controlpb.ListPortsResponse{Mode: string(ModeNone)}
	cfg := s.cfg
	if s.n != nil {
		c := s.n.Config()
		cfg = &c
	}
	if cfg != nil && cfg.Mode != "" {
		resp.Mode, resp.GuestIp = string(cfg.Mode), cfg.GuestIP
		_, resp.Egress = cfg.Summary()
		for _, f := range cfg.Forwards {
			resp.Forwards = append(resp.Forwards, toPB(f))
		}
	}
	return resp, nil
}

func (s *service) ExposePort(ctx context.Context, req *controlpb.ExposePortRequest) (*controlpb.ExposePortResponse, error) {
	n, err := s.stack()
	if err != nil {
		return nil, err
	}
	f, err := n.Expose(ctx, FromPB(req.Forward))
	if err != nil {
		return nil, err // of its kind (errdefs), sent by the server's interceptor
	}
	return &controlpb.ExposePortResponse{Forward: toPB(f)}, nil
}

func (s *service) ClosePort(ctx context.Context, req *controlpb.ClosePortRequest) (*controlpb.ClosePortResponse, error) {
	n, err := s.stack()
	if err != nil {
		return nil, err
	}
	if err := n.Unexpose(ctx, int(req.HostPort)); err != nil {
		return nil, err
	}
	return &controlpb.ClosePortResponse{}, nil
}
