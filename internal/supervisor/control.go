package supervisor

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
)

// control serves the supervisor's own API on the VM's socket.
type control struct {
	controlpb.UnimplementedControlServer
	s *Supervisor
}

func (c *control) Status(ctx context.Context, _ *controlpb.StatusRequest) (*controlpb.StatusResponse, error) {
	s := c.s
	info := s.machine.Info()
	state := "running"
	s.mu.Lock()
	if s.stopping {
		state = "stopping"
	}
	s.mu.Unlock()
	return &controlpb.StatusResponse{
		Id: s.id, State: state,
		SupervisorPid: int32(os.Getpid()), HypervisorPid: int32(s.machine.PID()),
		Accel: string(info.Accel), Channel: string(info.Channel),
	}, nil
}

func (c *control) Stop(ctx context.Context, req *controlpb.StopRequest) (*controlpb.StopResponse, error) {
	c.s.stopMachine(ctx, req.Force, time.Duration(req.TimeoutMs)*time.Millisecond)
	return &controlpb.StopResponse{}, nil
}

func (c *control) Pause(ctx context.Context, _ *controlpb.PauseRequest) (*controlpb.PauseResponse, error) {
	p, ok := c.s.machine.(hypervisor.Pauser)
	if !ok {
		return nil, status.Error(codes.Unimplemented, hypervisor.ErrUnsupported.Error())
	}
	if err := p.Pause(ctx); err != nil {
		return nil, err
	}
	return &controlpb.PauseResponse{}, nil
}

func (c *control) Resume(ctx context.Context, _ *controlpb.ResumeRequest) (*controlpb.ResumeResponse, error) {
	p, ok := c.s.machine.(hypervisor.Pauser)
	if !ok {
		return nil, status.Error(codes.Unimplemented, hypervisor.ErrUnsupported.Error())
	}
	if err := p.Resume(ctx); err != nil {
		return nil, err
	}
	return &controlpb.ResumeResponse{}, nil
}

// refreshRequest is what makes a restored guest a machine of its own:
// fresh entropy, the host's clock, its hostname and a new machine id.
func refreshRequest(hostname string) (*agentpb.RefreshRequest, error) {
	entropy := make([]byte, 64)
	if _, err := rand.Read(entropy); err != nil {
		return nil, err
	}
	mid := make([]byte, 16)
	if _, err := rand.Read(mid); err != nil {
		return nil, err
	}
	return &agentpb.RefreshRequest{
		Entropy:    entropy,
		TimeUnixNs: time.Now().UnixNano(),
		Hostname:   hostname,
		MachineId:  fmt.Sprintf("%x", mid),
	}, nil
}

// ConsoleTail returns the last n lines of a console log.
func ConsoleTail(path string, n int) string { return consolelog.Tail(path, n) }
