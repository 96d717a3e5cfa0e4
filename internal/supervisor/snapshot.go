package supervisor

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
)

// SnapshotSpec is the file in a snapshot folder that says how to start a
// machine from it: the machine must be built exactly like the saved one.
const SnapshotSpec = "spec.json"

// Snapshot saves the running machine into dir (memory and device state,
// plus the spec). The agent connection is dropped first, so the saved guest
// waits for a new host; with resume the VM goes on afterwards on a new
// connection, otherwise it stays paused.
func (s *Supervisor) Snapshot(ctx context.Context, dir string, resume bool) error {
	sn, ok := s.machine.(hypervisor.Snapshotter)
	if !ok {
		return hypervisor.ErrUnsupported
	}
	if len(s.spec.Machine.Disks) > 0 {
		return fmt.Errorf("snapshots of VMs with disks: %w", hypervisor.ErrUnsupported)
	}
	if s.tap != nil {
		// A clone would come up with this VM's leased address and TAP.
		return fmt.Errorf("snapshots of VMs in network mode tap (the guest's address is leased to this VM; use --net user): %w", hypervisor.ErrUnsupported)
	}
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create snapshot folder: %w", err)
	}
	b, err := json.MarshalIndent(s.spec, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, SnapshotSpec), b, 0o600); err != nil {
		return fmt.Errorf("write snapshot spec: %w", err)
	}
	// Hang up on the agent and give the guest a moment to see it, so the
	// saved agent is waiting for a new connection, not inside the old one.
	s.mu.Lock()
	old := s.agentConn
	s.mu.Unlock()
	_ = old.Close()
	time.Sleep(50 * time.Millisecond)
	if err := sn.Snapshot(ctx, dir); err != nil {
		_ = s.reconnect(ctx)
		return fmt.Errorf("snapshot: %w", err)
	}
	if !resume {
		return nil
	}
	if err := s.machine.(hypervisor.Pauser).Resume(ctx); err != nil {
		return err
	}
	return s.reconnect(ctx)
}

// reconnect dials the agent again and waits until it answers.
func (s *Supervisor) reconnect(ctx context.Context) error {
	conn, err := DialAgent(s.machine)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.agentConn, s.agent = conn, agentpb.NewAgentClient(conn)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err = s.Agent().Ping(ctx, &agentpb.PingRequest{}, waitForReady)
	return err
}

func (c *control) Snapshot(ctx context.Context, req *controlpb.SnapshotRequest) (*controlpb.SnapshotResponse, error) {
	if req.Dir == "" || !filepath.IsAbs(req.Dir) {
		return nil, status.Error(codes.InvalidArgument, "snapshot folder must be an absolute path")
	}
	if err := c.s.Snapshot(ctx, req.Dir, req.Resume); err != nil {
		return nil, err
	}
	fi, err := os.Stat(filepath.Join(req.Dir, "memory"))
	if err != nil {
		return nil, err
	}
	return &controlpb.SnapshotResponse{MemoryBytes: fi.Size()}, nil
}
