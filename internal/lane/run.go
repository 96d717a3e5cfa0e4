package lane

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// RecvRun reads a run's next message (TypeOutput).
func (k *Call) RecvRun(ctx context.Context) (*agentpb.RunOutput, error) {
	f, err := k.Recv(ctx)
	if err != nil {
		return nil, err
	}
	if f.Type != TypeOutput {
		return nil, fmt.Errorf("lane: protocol error: reply of type %d to a run", f.Type)
	}
	var m agentpb.RunOutput
	if err := proto.Unmarshal(f.Payload, &m); err != nil {
		return nil, fmt.Errorf("lane: protocol error: %w", err)
	}
	return &m, nil
}

// Signal sends sig to a run's process group (the lane's cancel call). It
// outlives ctx's end (detached): it is how a cancelled caller stops the
// guest's command.
func (c *Client) Signal(ctx context.Context, runID uint64, sig syscall.Signal) error {
	cctx, cancel := detached(ctx)
	defer cancel()
	return c.Unary(cctx, TypeCancel, &agentpb.CancelRequest{RunId: runID, Signal: int32(sig)}, &agentpb.CancelResponse{})
}

// Ack gives n bytes of a streamed run's output window back to the guest.
// A send that ctx ends breaks the connection, as any send does.
func (c *Client) Ack(ctx context.Context, runID uint64, n int64) error {
	return c.Send(ctx, TypeAck, &agentpb.RunAck{RunId: runID, Bytes: n})
}

// detached is ctx without its end, bounded to 5 s: for what a caller that
// gives up on a run still has to tell the guest.
func detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
}

// Abandon tells the guest that a streamed run's output is no longer
// wanted (a run waiting for its window then drops it).
func (c *Client) Abandon(ctx context.Context, runID uint64) error {
	cctx, cancel := detached(ctx)
	defer cancel()
	return c.Send(cctx, TypeAck, &agentpb.RunAck{RunId: runID, Abandon: true})
}

// Stop abandons a streamed run's output and kills its process group: what
// a caller that gives up on a run sends.
func (c *Client) Stop(ctx context.Context, runID uint64) {
	_ = c.Abandon(ctx, runID)
	_ = c.Signal(ctx, runID, syscall.SIGKILL)
}
