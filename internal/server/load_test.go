package server

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// TestV1ManyStreams: 50 WebSocket commands at once on one sandbox, each
// with its own output; every one gets all of its own and its exit.
func TestV1ManyStreams(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home})
	sb := ts.createSandbox(map[string]any{"timeout": -1})
	ctx := testutil.Context(t, 5*time.Minute)
	const n = 50
	var wg sync.WaitGroup
	var failed atomic.Int32
	for i := range n {
		wg.Go(func() {
			c := ts.dial(ctx, sb.ID)
			defer c.CloseNow()
			wsSend(t, ctx, c, map[string]any{"command": fmt.Sprintf("for j in 1 2 3; do echo %d-$j; sleep 0.1; done; exit %d", i, i%7)})
			out, _, exit := wsCollect(t, ctx, c)
			if want := fmt.Sprintf("%d-1\n%d-2\n%d-3\n", i, i, i); out != want || exit.ExitCode != i%7 {
				failed.Add(1)
				t.Errorf("stream %d: %q exit %d", i, out, exit.ExitCode)
			}
		})
	}
	wg.Wait()
	t.Logf("%d concurrent streams, %d failed", n, failed.Load())
}

// TestV1BoundedMemory: a large upload, download and streamed output pass
// through the server without its heap growing with them.
func TestV1BoundedMemory(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home})
	sb := ts.createSandbox(map[string]any{"timeout": -1, "memory_mib": 512})
	ctx := testutil.Context(t, 10*time.Minute)
	const size = 48 << 20
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			// The live heap: what a collection leaves.
			runtime.GC()
			runtime.ReadMemStats(&m)
			if m.HeapAlloc > peak.Load() {
				peak.Store(m.HeapAlloc)
			}
		}
	}()

	// Up (the default image's root is in guest RAM: 96 MiB fits in 512).
	resp := ts.send("PUT", sbPath(sb.ID, "/files?path=/tmp/big"), io.LimitReader(zeros{}, size), ts.key)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("upload: %d", resp.StatusCode)
	}
	// Down.
	resp = ts.send("GET", sbPath(sb.ID, "/files?path=/tmp/big"), nil, ts.key)
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != size {
		t.Fatalf("download: %d bytes, %v", n, err)
	}
	ts.run(sb.ID, map[string]any{"command": "rm /tmp/big"})
	// A stream printing as much.
	c := ts.dial(ctx, sb.ID)
	wsSend(t, ctx, c, map[string]any{"command": fmt.Sprintf("head -c %d /dev/zero", size)})
	var got int
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if typ != 2 { // binary
			break
		}
		got += len(msg) - 1
	}
	c.CloseNow()
	if got != size {
		t.Errorf("streamed %d bytes, want %d", got, size)
	}
	streamed := int64(peak.Load()) - int64(base.HeapAlloc)
	if streamed > 32<<20 {
		t.Errorf("the live heap grew by %d MiB while %d MiB went up, down and out of a stream", streamed>>20, size>>20)
	}
	// Buffered output is capped.
	resp = ts.send("POST", sbPath(sb.ID, "/exec"), map[string]any{"command": "yes abcdefg | head -c 20000000"}, ts.key)
	tail := &tailWriter{}
	n, err = io.Copy(tail, resp.Body)
	resp.Body.Close()
	if err != nil || n < 16<<20 || n > 20<<20 || !strings.Contains(string(tail.b), `"truncated":true`) {
		t.Errorf("buffered: %d bytes ending %q, %v", n, tail.b, err)
	}
	close(stop)
	<-sampled
	grew := int64(peak.Load()) - int64(base.HeapAlloc)
	t.Logf("live heap: %d MiB at the start, peak %d MiB while %d MiB went up, down and out of a stream, %d MiB with a buffered exec (cut at 16 MiB)", base.HeapAlloc>>20, (streamed+int64(base.HeapAlloc))>>20, size>>20, peak.Load()>>20)
	// The buffered call holds its output, cut at 16 MiB, a copy and its
	// JSON: a few times the cut, whatever the command prints.
	if grew > 128<<20 {
		t.Errorf("the heap grew by %d MiB while %d MiB went through", grew>>20, size>>20)
	}
}

// tailWriter keeps the last 200 bytes written.
type tailWriter struct{ b []byte }

func (w *tailWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	if len(w.b) > 200 {
		w.b = append([]byte(nil), w.b[len(w.b)-200:]...)
	}
	return len(p), nil
}

// zeros reads as endless zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
