package lane_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/fuzzseed"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// FuzzRead reads frames from arbitrary bytes: a frame is returned only
// whole and within lane.MaxPayload, and what was read writes back the same.
func FuzzRead(f *testing.F) {
	for _, b := range fuzzseed.LaneReplies() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		buf := make([]byte, 64)
		for {
			before := r.Len()
			fr, err := lane.Read(r, buf)
			if err != nil {
				if errors.Is(err, io.EOF) && before != 0 {
					t.Fatalf("io.EOF with %d bytes unread", before)
				}
				return
			}
			if len(fr.Payload) > lane.MaxPayload {
				t.Fatalf("payload of %d bytes passed the limit", len(fr.Payload))
			}
			consumed := data[len(data)-before : len(data)-r.Len()]
			back := binary.BigEndian.AppendUint32(nil, uint32(len(fr.Payload)))
			back = binary.BigEndian.AppendUint32(back, fr.ID)
			back = append(append(back, fr.Type), fr.Payload...)
			if !bytes.Equal(back, consumed) {
				t.Fatalf("frame %+v written back as %x, read from %x", fr, back, consumed)
			}
		}
	})
}

// FuzzClient is a guest that answers the host's calls with arbitrary
// bytes, then hangs up: every call ends, with its reply or an error, and
// the client never panics or waits past the hang-up.
func FuzzClient(f *testing.F) {
	for _, b := range fuzzseed.LaneReplies() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		host, guest := net.Pipe()
		go func() { _, _ = io.Copy(io.Discard, guest) }()
		c := lane.NewClient(host)
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// Calls 1, 2 and 3, as in the seeds: a ping, a run, a refresh.
		ping, err := c.Start(ctx, lane.TypePing, &agentpb.PingRequest{})
		if err != nil {
			t.Fatal(err)
		}
		run, err := c.Start(ctx, lane.TypeRun, &agentpb.ExecStart{Argv: []string{"true"}, RunId: lane.NewRunID(), Stream: true})
		if err != nil {
			t.Fatal(err)
		}
		refresh, err := c.Start(ctx, lane.TypeRefresh, &agentpb.RefreshRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(3)
		for _, k := range []*lane.Call{ping, refresh} {
			go func() {
				defer wg.Done()
				defer k.End()
				if f, err := k.Recv(ctx); err == nil {
					_ = proto.Unmarshal(f.Payload, &agentpb.RefreshResponse{})
				}
			}()
		}
		go func() {
			defer wg.Done()
			defer run.End()
			for {
				m, err := run.RecvRun(ctx)
				if err != nil || m.Exit != nil {
					return
				}
			}
		}()
		_, _ = guest.Write(data)
		guest.Close()
		wg.Wait()
		if ctx.Err() != nil {
			t.Fatal("a call outlived the guest's hang-up")
		}
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatal("the client did not notice the guest's hang-up")
		}
		if err := c.Err(); !errors.Is(err, lane.ErrClosed) {
			t.Fatalf("client after the guest hung up: %v", err)
		}
	})
}
