package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

type execResult struct {
	pid    int32
	stdout []byte
	stderr []byte
	exit   *agentpb.ExecExit
}

// execOpts drives an exec: after started, each step runs with the stream.
type execStep func(t *testing.T, s agentpb.Agent_ExecClient, pid int32)

func runExec(t *testing.T, c agentpb.AgentClient, start *agentpb.ExecStart, steps ...execStep) execResult {
	t.Helper()
	s, err := c.Exec(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: start}}); err != nil {
		t.Fatal(err)
	}
	var r execResult
	stepped := false
	for {
		m, err := s.Recv()
		if err != nil {
			t.Fatalf("recv: %v (stdout %q stderr %q)", err, r.stdout, r.stderr)
		}
		switch m := m.Msg.(type) {
		case *agentpb.ExecResponse_Started:
			r.pid = m.Started.Pid
		case *agentpb.ExecResponse_Stdout:
			r.stdout = append(r.stdout, m.Stdout...)
		case *agentpb.ExecResponse_Stderr:
			r.stderr = append(r.stderr, m.Stderr...)
		case *agentpb.ExecResponse_Exit:
			r.exit = m.Exit
			return r
		}
		if !stepped && r.pid != 0 {
			stepped = true
			for _, st := range steps {
				st(t, s, r.pid)
			}
		}
	}
}

func sendStdin(data string, closeAfter bool) execStep {
	return func(t *testing.T, s agentpb.Agent_ExecClient, _ int32) {
		if err := s.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Stdin{Stdin: []byte(data)}}); err != nil {
			t.Fatal(err)
		}
		if closeAfter {
			if err := s.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_CloseStdin{CloseStdin: true}}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestExecOutputAndExitCode(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: "echo out; echo err >&2; exit 3"})
	if string(r.stdout) != "out\n" || string(r.stderr) != "err\n" || r.exit.ExitCode != 3 || r.exit.Signal != 0 {
		t.Errorf("got stdout %q stderr %q exit %v", r.stdout, r.stderr, r.exit)
	}
	if r.pid <= 0 || r.exit.DurationNs <= 0 {
		t.Errorf("pid %d duration %d", r.pid, r.exit.DurationNs)
	}
}

func TestExecEnvAndDir(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"sh", "-c", "echo $FOO; pwd"}, Env: []string{"FOO=bar baz"}})
	if want := "bar baz\n" + te.dir + "\n"; string(r.stdout) != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}
	other := t.TempDir()
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: "pwd; echo ${HOME-unset} ${FOO-unset}", Dir: other, ClearEnv: true, Env: []string{"FOO=1"}})
	if want := other + "\nunset 1\n"; string(r.stdout) != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}
}

func TestExecStartErrors(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"true"}, Dir: "/nonexistent/dir"})
	if !strings.Contains(r.exit.Error, "/nonexistent/dir does not exist") || r.pid != 0 || r.exit.ExitCode != -1 {
		t.Errorf("exit %v pid %d", r.exit, r.pid)
	}
	// A command that cannot start gets the exit status a shell gives it.
	script := filepath.Join(t.TempDir(), "no-interpreter")
	if err := os.WriteFile(script, []byte("#!/no/such/interpreter\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		argv []string
		code int32
		says string
	}{
		{[]string{"no-such-command-xyz"}, 127, "not found"},
		{[]string{"/no/such/dir/cmd"}, 127, "no such file"},
		{[]string{"/etc/passwd"}, 126, "permission denied"},
		{[]string{os.TempDir()}, 126, "is a directory"},
		{[]string{script}, 127, "no such file"}, // its interpreter is missing
	} {
		r = runExec(t, te.client, &agentpb.ExecStart{Argv: c.argv})
		if r.exit.ExitCode != c.code || !strings.Contains(r.exit.Error, c.says) {
			t.Errorf("%v: exit code %d, error %q; want %d and %q", c.argv, r.exit.ExitCode, r.exit.Error, c.code, c.says)
		}
	}
	// The first message must be start.
	s, err := te.client.Exec(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = s.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Signal{Signal: 9}})
	if _, err := s.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("got %v, want InvalidArgument", err)
	}
}

func TestExecTimeoutKillsGroup(t *testing.T) {
	te := newTestEnv(t)
	start := time.Now()
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: "sleep 30 & echo $!; sleep 30", TimeoutMs: 500})
	if !r.exit.TimedOut || r.exit.ExitCode != -1 || r.exit.Signal != int32(syscall.SIGKILL) {
		t.Errorf("exit %v", r.exit)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s", d)
	}
	child, err := strconv.Atoi(strings.TrimSpace(string(r.stdout)))
	if err != nil {
		t.Fatalf("child pid %q: %v", r.stdout, err)
	}
	waitGone(t, child)
}

// A background child that keeps writing after the command exited, out of
// the command's process group, ends with the timeout too: the timeout
// bounds the output (it was stopped when the command exited, and the
// output streamed for ever).
func TestExecTimeoutBoundsOutput(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: `setsid sh -c 'echo $$; while :; do echo x; done' & exit 0`, TimeoutMs: 1000})
	if !r.exit.TimedOut || r.exit.ExitCode != 0 {
		t.Errorf("exit %v; want timed out, with the command's own exit status", r.exit)
	}
	first, _, _ := strings.Cut(string(r.stdout), "\n")
	child, err := strconv.Atoi(first)
	if err != nil {
		t.Fatalf("child pid %q: %v", first, err)
	}
	waitGone(t, child) // killed writing to the closed pipe
}

// waitGone waits until a pid no longer exists (killed and reaped).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			t.Fatalf("pid %d still exists: %s", pid, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestExecBackgroundChildHoldsPipes(t *testing.T) {
	te := newTestEnv(t)
	start := time.Now()
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: "sleep 5 & echo $!; echo done"})
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("exit waited %s for a background child", d)
	}
	lines := strings.Fields(string(r.stdout))
	if len(lines) != 2 || lines[1] != "done" || r.exit.ExitCode != 0 {
		t.Fatalf("stdout %q exit %v", r.stdout, r.exit)
	}
	pid, _ := strconv.Atoi(lines[0])
	_ = syscall.Kill(pid, syscall.SIGKILL)
	waitGone(t, pid) // the orphan is reaped
}

func TestExecBinaryOutput(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: `printf '\377\376\000x'`})
	if !bytes.Equal(r.stdout, []byte{0xff, 0xfe, 0, 'x'}) {
		t.Errorf("stdout %q", r.stdout)
	}
}

func TestExecLargeOutput(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: "head -c 5000000 /dev/zero"})
	if len(r.stdout) != 5000000 || r.exit.ExitCode != 0 {
		t.Errorf("got %d bytes, exit %v", len(r.stdout), r.exit)
	}
}

func TestExecStdin(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"cat"}, Stdin: true}, sendStdin("hello\xff", true))
	if string(r.stdout) != "hello\xff" || r.exit.ExitCode != 0 {
		t.Errorf("stdout %q exit %v", r.stdout, r.exit)
	}
	// Without stdin the process reads /dev/null.
	r = runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"cat"}})
	if len(r.stdout) != 0 || r.exit.ExitCode != 0 {
		t.Errorf("stdout %q exit %v", r.stdout, r.exit)
	}
}

func TestExecSignal(t *testing.T) {
	te := newTestEnv(t)
	sig := func(t *testing.T, s agentpb.Agent_ExecClient, _ int32) {
		if err := s.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Signal{Signal: int32(syscall.SIGTERM)}}); err != nil {
			t.Fatal(err)
		}
	}
	r := runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"sleep", "30"}, Stdin: true}, sig)
	if r.exit.ExitCode != -1 || r.exit.Signal != 15 || r.exit.TimedOut {
		t.Errorf("exit %v", r.exit)
	}
}

func TestExecCancelKills(t *testing.T) {
	te := newTestEnv(t)
	cctx, ccancel := contextWithCancel(t)
	cs, err := te.client.Exec(cctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.Send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: &agentpb.ExecStart{Argv: []string{"sleep", "30"}}}}); err != nil {
		t.Fatal(err)
	}
	m, err := cs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	pid := int(m.GetStarted().GetPid())
	ccancel()
	waitGone(t, pid)
}

func TestExecTTY(t *testing.T) {
	te := newTestEnv(t)
	r := runExec(t, te.client, &agentpb.ExecStart{Argv: []string{"tty"}, Tty: true})
	if !strings.HasPrefix(string(r.stdout), "/dev/pts/") || r.exit.ExitCode != 0 {
		t.Errorf("stdout %q exit %v", r.stdout, r.exit)
	}

	// Initial size, then a resize once the first stty has answered.
	s, err := te.client.Exec(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	send := func(m *agentpb.ExecRequest) {
		if err := s.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Start{Start: &agentpb.ExecStart{
		Shell: "stty size; read x; stty size",
		Tty:   true, Stdin: true,
		Size: &agentpb.WindowSize{Rows: 24, Cols: 80},
	}}})
	var out string
	resized := false
	for {
		m, err := s.Recv()
		if err != nil {
			t.Fatalf("recv: %v (output %q)", err, out)
		}
		out += strings.ReplaceAll(string(m.GetStdout()), "\r", "")
		if e := m.GetExit(); e != nil {
			if e.ExitCode != 0 {
				t.Errorf("exit %v", e)
			}
			break
		}
		if !resized && strings.Contains(out, "24 80\n") {
			resized = true
			send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Resize{Resize: &agentpb.WindowSize{Rows: 40, Cols: 100}}})
			send(&agentpb.ExecRequest{Msg: &agentpb.ExecRequest_Stdin{Stdin: []byte("go\n")}})
		}
	}
	if !strings.HasPrefix(out, "24 80\n") || !strings.HasSuffix(out, "40 100\n") {
		t.Errorf("output %q", out)
	}
}

func TestExecConcurrent(t *testing.T) {
	te := newTestEnv(t)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := runExec(t, te.client, &agentpb.ExecStart{Shell: fmt.Sprintf("echo %d; exit %d", i, i)})
			if string(r.stdout) != fmt.Sprintf("%d\n", i) || r.exit.ExitCode != int32(i) {
				t.Errorf("exec %d: stdout %q exit %v", i, r.stdout, r.exit)
			}
		}()
	}
	wg.Wait()
}

func TestUpdateEnv(t *testing.T) {
	te := newTestEnv(t)
	ctx := testCtx(t)
	resp, err := te.client.UpdateEnv(ctx, &agentpb.UpdateEnvRequest{Set: map[string]string{"A": "1", "B": "it's"}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Env["A"] != "1" || resp.Env["B"] != "it's" {
		t.Errorf("env %v", resp.Env)
	}
	r := runExec(t, te.client, &agentpb.ExecStart{Shell: `echo "$A $B"`, Env: []string{"A=2"}})
	if string(r.stdout) != "2 it's\n" {
		t.Errorf("stdout %q", r.stdout)
	}
	resp, err = te.client.UpdateEnv(ctx, &agentpb.UpdateEnvRequest{Unset: []string{"A"}})
	if err != nil || len(resp.Env) != 1 {
		t.Fatalf("env %v err %v", resp.GetEnv(), err)
	}
	b, _ := os.ReadFile(te.envFile)
	if string(b) != "B=it's\n" {
		t.Errorf("env file %q", b)
	}
	// The profile snippet is valid shell that exports the value.
	r = runExec(t, te.client, &agentpb.ExecStart{Shell: ". " + te.profile + `; sh -c 'echo "$B"'`, ClearEnv: true})
	if string(r.stdout) != "it's\n" {
		t.Errorf("profile gave %q (%s)", r.stdout, r.stderr)
	}
	// A new server loads the saved environment.
	srv, err := NewServer(te.srv.cfg)
	if err != nil || len(srv.sandboxEnv()) != 1 {
		t.Errorf("reloaded env %v err %v", srv.sandboxEnv(), err)
	}
	for _, req := range []*agentpb.UpdateEnvRequest{
		{Set: map[string]string{"1A": "x"}},
		{Set: map[string]string{"A-B": "x"}},
		{Set: map[string]string{"A": "line\nbreak"}},
		{Unset: []string{"A=B"}},
	} {
		if _, err := te.client.UpdateEnv(ctx, req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("UpdateEnv(%v) = %v, want InvalidArgument", req, err)
		}
	}
	if _, err := os.Stat(filepath.Dir(te.envFile)); err != nil {
		t.Error(err)
	}
}

// unread sees bytes a process wrote to its output that nobody read yet,
// and leaves the descriptor non-blocking for the poller.
func TestProcessUnread(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	p := &process{outputs: []output{{f: r}}}
	if p.unread() {
		t.Error("unread on an empty pipe")
	}
	if _, err := w.Write([]byte("left")); err != nil {
		t.Fatal(err)
	}
	if !p.unread() {
		t.Error("unread does not see 4 bytes in the pipe")
	}
	buf := make([]byte, 8)
	if n, err := r.Read(buf); err != nil || n != 4 {
		t.Fatalf("read %d, %v", n, err)
	}
	if p.unread() {
		t.Error("unread after the bytes were read")
	}
	// Still non-blocking: a read deadline works only on a polled descriptor.
	if err := r.SetReadDeadline(time.Now().Add(10 * time.Millisecond)); err != nil {
		t.Errorf("pipe no longer polled after unread: %v", err)
	} else if _, err := r.Read(buf); !os.IsTimeout(err) {
		t.Errorf("read of an empty pipe with a deadline: %v, want a timeout", err)
	}
}

// After the process exits, output still in its pipes is waited for even
// when no reader makes progress for longer than pipeGrace (a reader that is
// not scheduled); once the pipes are empty and the readers idle, the wait
// ends after pipeGrace.
func TestWaitOutputWaitsForUnreadBytes(t *testing.T) {
	var progress atomic.Int64
	var sending atomic.Int32
	var drained atomic.Bool
	go func() {
		time.Sleep(3 * pipeGrace)
		drained.Store(true)
	}()
	waitOutput(context.Background(), make(chan struct{}), nil, &progress, &sending, func() bool { return !drained.Load() })
	if !drained.Load() {
		t.Fatal("waitOutput gave up while the pipes still held output")
	}
	start := time.Now()
	waitOutput(context.Background(), make(chan struct{}), nil, &progress, &sending, func() bool { return false })
	if d := time.Since(start); d < pipeGrace {
		t.Errorf("waitOutput with idle readers and empty pipes returned after %v, before pipeGrace (%v)", d, pipeGrace)
	}
}
