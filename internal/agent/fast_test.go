package agent

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// newLane serves the fast lane of te's server on one end of a unix socket
// (so that the raw descriptor I/O is what runs) and returns a client on
// the other, and the server's end.
func newLane(t *testing.T, te *testEnv) (*lane.Client, net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "fast.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	hc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	gc := <-accepted
	if gc == nil {
		t.Fatal("accept failed")
	}
	go func() { _ = te.srv.ServeLane(gc) }()
	c := lane.NewClient(hc)
	t.Cleanup(func() { c.Close() })
	return c, gc
}

type laneRun struct {
	stdout, stderr []byte
	exit           *agentpb.ExecExit
	truncated      bool
	frames         int
}

func runLane(t *testing.T, c *lane.Client, start *agentpb.ExecStart) (laneRun, error) {
	t.Helper()
	k, err := c.Start(testCtx(t), lane.TypeRun, start)
	if err != nil {
		t.Fatal(err)
	}
	defer k.End()
	var r laneRun
	for {
		m, err := k.RecvRun(testCtx(t))
		if err != nil {
			return r, err
		}
		r.frames++
		r.stdout = append(r.stdout, m.Stdout...)
		r.stderr = append(r.stderr, m.Stderr...)
		if m.Exit != nil {
			r.exit, r.truncated = m.Exit, m.Truncated
			return r, nil
		}
	}
}

func TestLanePing(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	var r agentpb.PingResponse
	if err := c.Unary(testCtx(t), lane.TypePing, &agentpb.PingRequest{}, &r); err != nil {
		t.Fatal(err)
	}
	if r.AgentVersion != Version || r.UptimeNs <= 0 || r.Kernel == "" || r.Hostname == "" {
		t.Errorf("incomplete ping: %v", &r)
	}
}

func TestLaneRun(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)

	r, err := runLane(t, c, &agentpb.ExecStart{Shell: "echo out; echo err >&2; pwd; exit 3"})
	if err != nil {
		t.Fatal(err)
	}
	if r.exit.ExitCode != 3 || string(r.stdout) != "out\n"+te.dir+"\n" || string(r.stderr) != "err\n" || r.frames != 1 {
		t.Errorf("run = exit %d, stdout %q, stderr %q in %d frames", r.exit.ExitCode, r.stdout, r.stderr, r.frames)
	}

	// Output past one frame comes in several; a limit cuts each stream.
	r, err = runLane(t, c, &agentpb.ExecStart{Shell: "head -c 300000 /dev/zero; head -c 5000 /dev/zero >&2"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.stdout) != 300000 || len(r.stderr) != 5000 || r.frames < 2 || r.truncated {
		t.Errorf("big output: %d+%d bytes in %d frames, truncated %v", len(r.stdout), len(r.stderr), r.frames, r.truncated)
	}
	r, err = runLane(t, c, &agentpb.ExecStart{Shell: "head -c 300000 /dev/zero; echo e >&2", OutputLimit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.stdout) != 1000 || string(r.stderr) != "e\n" || !r.truncated || r.exit.ExitCode != 0 {
		t.Errorf("limited output: %d bytes, stderr %q, truncated %v, exit %d", len(r.stdout), r.stderr, r.truncated, r.exit.ExitCode)
	}

	// A command that cannot start says why in its exit.
	r, err = runLane(t, c, &agentpb.ExecStart{Argv: []string{"true"}, Dir: "/nonexistent"})
	if err != nil || !strings.Contains(r.exit.GetError(), "does not exist") {
		t.Errorf("bad directory: %v, exit %v", err, r.exit)
	}
	// Bad requests are errors of the call.
	if _, err := runLane(t, c, &agentpb.ExecStart{Shell: "true", Tty: true}); err == nil || !strings.Contains(err.Error(), "Agent.Exec") {
		t.Errorf("run on a terminal: %v", err)
	}
	if _, err := runLane(t, c, &agentpb.ExecStart{}); err == nil {
		t.Error("run of nothing: no error")
	}
	if _, err := runLane(t, c, &agentpb.ExecStart{Shell: "true", Env: []string{"NOEQUALS"}}); err == nil {
		t.Error("run with a bad environment entry: no error")
	}
	if err := c.Unary(testCtx(t), 99, &agentpb.PingRequest{}, &agentpb.PingResponse{}); err == nil || !strings.Contains(err.Error(), "unknown call type") {
		t.Errorf("unknown call type: %v", err)
	}
	// The lane still works after all that.
	if err := c.Unary(testCtx(t), lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{}); err != nil {
		t.Fatal(err)
	}
}

func TestLaneRunTimeoutAndCancel(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	r, err := runLane(t, c, &agentpb.ExecStart{Shell: "sleep 30", TimeoutMs: 100})
	if err != nil || !r.exit.TimedOut || r.exit.Signal != int32(syscall.SIGKILL) {
		t.Fatalf("timeout: %v, exit %v", err, r.exit)
	}

	done := make(chan laneRun, 1)
	go func() {
		r, err := runLane(t, c, &agentpb.ExecStart{Shell: "sleep 30", RunId: 77})
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	// Cancel until the run is there to be cancelled.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := c.Unary(testCtx(t), lane.TypeCancel, &agentpb.CancelRequest{RunId: 77}, &agentpb.CancelResponse{}); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-done:
			if r.exit.GetSignal() != int32(syscall.SIGKILL) {
				t.Fatalf("cancelled run ended with %v", r.exit)
			}
			return
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("cancel did not end the run")
		}
	}
}

func TestLaneHangUpKillsRuns(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	pidFile := filepath.Join(te.dir, "pid")
	k, err := c.Start(testCtx(t), lane.TypeRun, &agentpb.ExecStart{Shell: "echo $$ > pid; exec sleep 30"})
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	waitFor(t, func() bool {
		b, err := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(string(bytes.TrimSpace(b)))
		return err == nil && pid > 0
	})
	k.End()
	c.Close()
	waitFor(t, func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatal("condition not met in 20s")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestLaneRefresh(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	err := c.Unary(testCtx(t), lane.TypeRefresh, &agentpb.RefreshRequest{Hostname: "bad host"}, &agentpb.RefreshResponse{})
	if err == nil || !strings.Contains(err.Error(), "invalid hostname") {
		t.Errorf("refresh with a bad hostname: %v", err)
	}
	// Only the machine id: the test must not set the host's clock or name.
	id := strings.Repeat("ab", 16)
	if err := c.Unary(testCtx(t), lane.TypeRefresh, &agentpb.RefreshRequest{MachineId: id}, &agentpb.RefreshResponse{}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(te.srv.cfg.MachineIDFile); err != nil || string(b) != id+"\n" {
		t.Errorf("machine id after refresh: %q, %v", b, err)
	}
}

// A streamed run names its process first and sends output as it is read:
// the first line arrives while the command still runs (it waits for a
// file the test writes only then), and a signal of the test's choice ends
// it.
func TestLaneRunStream(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	gate := filepath.Join(t.TempDir(), "gate")
	k, err := c.Start(testCtx(t), lane.TypeRun, &agentpb.ExecStart{RunId: 5, Stream: true,
		Shell: "echo first; while [ ! -e " + gate + " ]; do sleep 0.01; done; echo second; sleep 30"})
	if err != nil {
		t.Fatal(err)
	}
	defer k.End()
	next := func() *agentpb.RunOutput {
		t.Helper()
		m, err := k.RecvRun(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := next(); m.Started.GetPid() <= 0 || m.Exit != nil || len(m.Stdout) > 0 {
		t.Fatalf("first message of a streamed run: %v", m)
	}
	if m := next(); string(m.Stdout) != "first\n" || m.Exit != nil {
		t.Fatalf("second message: %v, want the first line alone", m)
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if m := next(); string(m.Stdout) != "second\n" || m.Exit != nil {
		t.Fatalf("third message: %v, want the second line alone", m)
	}
	if err := c.Unary(testCtx(t), lane.TypeCancel, &agentpb.CancelRequest{RunId: 5, Signal: int32(syscall.SIGTERM)}, &agentpb.CancelResponse{}); err != nil {
		t.Fatal(err)
	}
	if m := next(); m.Exit.GetSignal() != int32(syscall.SIGTERM) {
		t.Fatalf("after SIGTERM: %v", m)
	}
}

// A streamed run sends no more than its window of output ahead of the
// host's acknowledgements; an abandoned run drops the rest and ends.
func TestLaneRunStreamWindow(t *testing.T) {
	te := newTestEnv(t)
	c, _ := newLane(t, te)
	const total = 3 << 20
	k, err := c.Start(testCtx(t), lane.TypeRun, &agentpb.ExecStart{RunId: 9, Stream: true,
		Shell: "head -c " + strconv.Itoa(total) + " /dev/zero"})
	if err != nil {
		t.Fatal(err)
	}
	defer k.End()
	got := 0
	recv := func(ctx context.Context) (*agentpb.RunOutput, error) {
		m, err := k.RecvRun(ctx)
		if err == nil {
			got += len(m.Stdout)
		}
		return m, err
	}
	if m, err := recv(testCtx(t)); err != nil || m.Started == nil {
		t.Fatalf("first message: %v, %v", m, err)
	}
	// Without acknowledgements the output fills the window (the last
	// read may pass it by one buffer), then stops.
	for got < streamWindow {
		m, err := recv(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if m.Exit != nil {
			t.Fatalf("the run ended with %d of %d bytes sent and none acknowledged", got, total)
		}
	}
	ctx, cancel := context.WithTimeout(testCtx(t), 500*time.Millisecond)
	m, err := recv(ctx)
	cancel()
	if err == nil {
		t.Fatalf("more output past the window (%d bytes sent, none acknowledged): %d bytes, exit %v", got, len(m.Stdout), m.Exit)
	}
	if got > streamWindow+outputChunk {
		t.Fatalf("%d bytes sent ahead of any acknowledgement; the window is %d", got, streamWindow)
	}
	// Acknowledged as read, the rest comes, and the exit.
	acked := 0
	for {
		if err := c.Send(testCtx(t), lane.TypeAck, &agentpb.RunAck{RunId: 9, Bytes: int64(got - acked)}); err != nil {
			t.Fatal(err)
		}
		acked = got
		m, err := recv(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if m.Exit != nil {
			break
		}
	}
	if got != total {
		t.Fatalf("received %d bytes, want %d", got, total)
	}

	// An endless run whose output the host abandons ends once killed.
	k2, err := c.Start(testCtx(t), lane.TypeRun, &agentpb.ExecStart{RunId: 10, Stream: true, Shell: "yes"})
	if err != nil {
		t.Fatal(err)
	}
	defer k2.End()
	if f, err := k2.Recv(testCtx(t)); err != nil || f.Type != lane.TypeOutput {
		t.Fatalf("first message: %v, %v", f, err) // started: the run is registered
	}
	if err := c.Send(testCtx(t), lane.TypeAck, &agentpb.RunAck{RunId: 10, Abandon: true}); err != nil {
		t.Fatal(err)
	}
	if err := c.Unary(testCtx(t), lane.TypeCancel, &agentpb.CancelRequest{RunId: 10}, &agentpb.CancelResponse{}); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := k2.RecvRun(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if m.Exit != nil {
			if m.Exit.Signal != int32(syscall.SIGKILL) {
				t.Fatalf("abandoned run ended with %v", m.Exit)
			}
			break
		}
	}
}
