package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// heldStream is a WatchDir stream whose host does not read: every Send
// after the start waits until gate is closed.
type heldStream struct {
	grpc.ServerStream
	ctx     context.Context
	started chan struct{}
	gate    chan struct{}
	mu      sync.Mutex
	got     []*agentpb.WatchDirResponse
}

func (h *heldStream) Context() context.Context { return h.ctx }

func (h *heldStream) Send(r *agentpb.WatchDirResponse) error {
	if r.GetStarted() {
		close(h.started)
		return nil
	}
	select {
	case <-h.gate:
	case <-h.ctx.Done():
		return h.ctx.Err()
	}
	h.mu.Lock()
	h.got = append(h.got, r)
	h.mu.Unlock()
	return nil
}

// TestWatchDirQueueOverflow: while the host does not read, the agent
// queues at most maxWatchQueue events, then drops them and says so; once
// the host reads again, later events arrive.
func TestWatchDirQueueOverflow(t *testing.T) {
	dir := t.TempDir()
	full := make(chan struct{})
	var once sync.Once
	watchQueueFull = func() { once.Do(func() { close(full) }) }
	defer func() { watchQueueFull = nil }()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := &heldStream{ctx: ctx, started: make(chan struct{}), gate: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- (&Server{}).WatchDir(&agentpb.WatchDirRequest{Path: dir}, h) }()
	select {
	case <-h.started:
	case err := <-done:
		t.Fatal(err)
	}
	const files = maxWatchQueue + 1000
	for i := range files {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint("f", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The queue fills: the reader goes on while the sender is held.
	select {
	case <-full:
	case <-ctx.Done():
		t.Fatal("the agent's watch queue never overflowed")
	}
	close(h.gate)
	// A later file's event arrives once the host reads. One is written
	// every 250 ms until one arrives: while the kernel's own inotify
	// queue is still full of the flood (a loaded host reads it slowly),
	// the kernel drops new events, as it should.
	lasts := 0
	writeLast := func() {
		lasts++
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint("last", lasts)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeLast()
	nextLast := time.Now().Add(250 * time.Millisecond)
	for {
		h.mu.Lock()
		var n int
		overflow, sawLast := false, false
		for _, r := range h.got {
			overflow = overflow || r.GetOverflow()
			for _, e := range r.GetEvents() {
				n++
				sawLast = sawLast || strings.HasPrefix(filepath.Base(e.GetPath()), "last")
			}
		}
		h.mu.Unlock()
		if sawLast {
			if !overflow || n > maxWatchQueue+maxWatchBatch+lasts {
				t.Errorf("%d events (of %d made), overflow %v; want at most the queue and a batch, and an overflow", n, files+lasts, overflow)
			}
			break
		}
		if time.Now().After(nextLast) {
			writeLast()
			nextLast = time.Now().Add(250 * time.Millisecond)
		}
		select {
		case err := <-done:
			t.Fatalf("watch ended: %v (%d later files written, none reported)", err, lasts)
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("WatchDir after its context ended: %v", err)
	}
}
