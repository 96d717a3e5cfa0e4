package e2b

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"mime/multipart"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/smolvm/smolvm/internal/e2b/proto/filesystem"
	pb "github.com/smolvm/smolvm/internal/e2b/proto/process"
	"github.com/smolvm/smolvm/internal/testutil"
)

// result is what a command's stream said.
type result struct {
	pid            uint32
	stdout, stderr string
	end            *pb.ProcessEvent_EndEvent
}

// collect reads a Start or Connect stream to its end.
func collect[T any, P interface {
	*T
	GetEvent() *pb.ProcessEvent
}](t *testing.T, s *connect.ServerStreamForClient[T]) (result, error) {
	t.Helper()
	var r result
	for s.Receive() {
		ev := P(s.Msg()).GetEvent()
		switch {
		case ev.GetStart() != nil:
			r.pid = ev.GetStart().Pid
		case ev.GetData() != nil:
			r.stdout += string(ev.GetData().GetStdout())
			r.stderr += string(ev.GetData().GetStderr())
		case ev.GetEnd() != nil:
			r.end = ev.GetEnd()
		}
	}
	return r, s.Err()
}

func bash(cmd string) *pb.ProcessConfig {
	return &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", cmd}}
}

func ptr[T any](v T) *T { return &v }

// TestEnvdProcess drives process.Process over Connect's JSON codec on a
// real sandbox: streamed output, exit codes, cwd, env (per command and
// sandbox-wide), stdin, a command's timeout, background commands that
// outlive their client (list, connect, kill), and the access token.
func TestEnvdProcess(t *testing.T) {
	s := newAPIServer(t, 10*time.Minute)
	sb := s.create(map[string]any{"templateID": "base", "timeout": 600, "envVars": map[string]string{"SBVAR": "sandbox-wide"}})
	c := s.envd(sb)
	ctx := testutil.Context(t, 5*time.Minute)

	t.Run("output and exit", func(t *testing.T) {
		st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash(`echo out; echo err >&2; echo "$0"; exit 3`)}))
		if err != nil {
			t.Fatal(err)
		}
		r, err := collect(t, st)
		if err != nil {
			t.Fatal(err)
		}
		if r.pid == 0 || r.stdout != "out\n/bin/sh\n" || r.stderr != "err\n" || r.end == nil || r.end.ExitCode != 3 || !r.end.Exited || r.end.Error == nil {
			t.Errorf("got pid %d stdout %q stderr %q end %v", r.pid, r.stdout, r.stderr, r.end)
		}
	})
	t.Run("cwd and env", func(t *testing.T) {
		conf := bash(`pwd; echo "$FOO $SBVAR"`)
		conf.Cwd = ptr("/tmp")
		conf.Envs = map[string]string{"FOO": "bar"}
		st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: conf}))
		if err != nil {
			t.Fatal(err)
		}
		r, err := collect(t, st)
		if err != nil || r.stdout != "/tmp\nbar sandbox-wide\n" || r.end.GetExitCode() != 0 {
			t.Errorf("got %q %v, err %v", r.stdout, r.end, err)
		}
	})
	t.Run("missing program", func(t *testing.T) {
		st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/no/such/program"}}))
		if err == nil {
			_, err = collect(t, st)
		}
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "/no/such/program") {
			t.Errorf("got %v, want InvalidArgument naming the program", err)
		}
	})
	t.Run("stdin", func(t *testing.T) {
		st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash("read a; echo got:$a; cat"), Stdin: ptr(true)}))
		if err != nil {
			t.Fatal(err)
		}
		if !st.Receive() || st.Msg().GetEvent().GetStart() == nil {
			t.Fatalf("no start event: %v", st.Err())
		}
		sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: st.Msg().GetEvent().GetStart().Pid}}
		for _, in := range []string{"hello\n", "rest\n"} {
			if _, err := c.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte(in)}}})); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel})); err != nil {
			t.Fatal(err)
		}
		r, err := collect(t, st)
		if err != nil || r.stdout != "got:hello\nrest\n" || r.end.GetExitCode() != 0 {
			t.Errorf("got %q %v, err %v", r.stdout, r.end, err)
		}
	})
	t.Run("timeout kills", func(t *testing.T) {
		tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		st, err := c.proc.Start(tctx, connect.NewRequest(&pb.StartRequest{Process: bash("sleep 600")}))
		if err != nil {
			t.Fatal(err)
		}
		r, err := collect(t, st)
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded {
			t.Errorf("got %v, want DeadlineExceeded", err)
		}
		// The command is gone from the table once the guest killed it.
		if err := testutil.Poll(time.Minute, func() bool { return !listed(t, ctx, c, r.pid) }); err != nil {
			t.Errorf("process %d still listed after its timeout", r.pid)
		}
	})
	t.Run("background", func(t *testing.T) {
		sctx, cancel := context.WithCancel(ctx)
		st, err := c.proc.Start(sctx, connect.NewRequest(&pb.StartRequest{Process: bash("echo first; read x; echo second:$x; sleep 600"), Stdin: ptr(true), Tag: ptr("bg")}))
		if err != nil {
			t.Fatal(err)
		}
		var pid uint32
		var out string
		for out != "first\n" && st.Receive() {
			ev := st.Msg().GetEvent()
			if ev.GetStart() != nil {
				pid = ev.GetStart().Pid
			}
			out += string(ev.GetData().GetStdout())
		}
		cancel() // the client goes away; the command stays
		_ = st.Close()
		if !listed(t, ctx, c, pid) {
			t.Fatalf("background process %d not listed after its client left", pid)
		}
		sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: "bg"}}
		if _, err := c.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x\n")}}})); err != nil {
			t.Fatal(err)
		}
		cs, err := c.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}}))
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		for !strings.Contains(got, "second:x") && cs.Receive() {
			got += string(cs.Msg().GetEvent().GetData().GetStdout())
		}
		if !strings.Contains(got, "second:x") {
			t.Fatalf("connect got %q, %v", got, cs.Err())
		}
		if _, err := c.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
			t.Fatal(err)
		}
		r, err := collect(t, cs)
		if err != nil || r.end == nil || r.end.Exited || r.end.ExitCode != -1 {
			t.Errorf("after kill: %v, %v; want an end event of a killed process", r.end, err)
		}
		_, err = c.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL}))
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("kill of an ended process: %v, want NotFound", err)
		}
	})
	t.Run("server stops streams", func(t *testing.T) {
		st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash("echo up; sleep 600")}))
		if err != nil {
			t.Fatal(err)
		}
		var pid uint32
		for st.Receive() && st.Msg().GetEvent().GetData() == nil {
			if ev := st.Msg().GetEvent().GetStart(); ev != nil {
				pid = ev.Pid
			}
		}
		s.h.StopStreams() // what a server shutting down does (the last subtest using streams)
		r, err := collect(t, st)
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "shutting down") || r.end != nil {
			t.Errorf("stream at shutdown: %v, end %v; want Unavailable saying the server shuts down", err, r.end)
		}
		if !listed(t, ctx, c, pid) {
			t.Errorf("process %d gone after the server stopped its stream", pid)
		}
	})
	t.Run("access token", func(t *testing.T) {
		bad := s.envd(sandboxJSON{SandboxID: sb.SandboxID, EnvdAccessToken: "wrong"})
		_, err := bad.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Errorf("wrong token: %v, want Unauthenticated", err)
		}
		gone := s.envd(sandboxJSON{SandboxID: "nosuchsandbox"})
		_, err = gone.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "not found") {
			t.Errorf("unknown sandbox: %v, want Unavailable saying not found", err)
		}
	})
}

func listed(t *testing.T, ctx context.Context, c envdClients, pid uint32) bool {
	t.Helper()
	l, err := c.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Msg.Processes {
		if p.Pid == pid {
			return true
		}
	}
	return false
}

// TestEnvdFiles drives /files and filesystem.Filesystem on a real sandbox:
// a few MiB up (multipart and octet-stream) and down, byte for byte; stat,
// list, make, move, remove; a watch; and the errors the SDK maps (404 and
// NotFound as file not found, AlreadyExists for an existing directory).
func TestEnvdFiles(t *testing.T) {
	s := newAPIServer(t, 10*time.Minute)
	sb := s.create(map[string]any{"templateID": "base", "timeout": 600})
	c := s.envd(sb)
	ctx := testutil.Context(t, 5*time.Minute)

	data := make([]byte, 3<<20+17)
	rand.Read(data)
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	fw, _ := mw.CreateFormFile("file", "/tmp/up/dir/big.bin")
	if _, err := fw.Write(data); err != nil || mw.Close() != nil {
		t.Fatal("make the form")
	}
	st, body := s.files("POST", sb, "path=/tmp/up/dir/big.bin", mw.FormDataContentType(), &form)
	var written []writtenEntry
	if st != http.StatusOK || json.Unmarshal(body, &written) != nil || len(written) != 1 || written[0].Path != "/tmp/up/dir/big.bin" {
		t.Fatalf("multipart upload: %d %s", st, body)
	}
	st, body = s.files("GET", sb, "path=/tmp/up/dir/big.bin", "", nil)
	if st != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("download: %d, %d bytes (want %d, equal)", st, len(body), len(data))
	}
	st, body = s.files("POST", sb, "path=rel.txt", "application/octet-stream", strings.NewReader("relative"))
	if st != http.StatusOK || !strings.Contains(string(body), `"/root/rel.txt"`) {
		t.Fatalf("octet-stream upload to a relative path: %d %s", st, body)
	}
	if st, body = s.files("GET", sb, "path=/root/rel.txt", "", nil); st != http.StatusOK || string(body) != "relative" {
		t.Errorf("read back: %d %q", st, body)
	}
	if st, body = s.files("GET", sb, "path=/tmp/nope", "", nil); st != http.StatusNotFound || !strings.Contains(string(body), `"code":404`) {
		t.Errorf("missing file: %d %s, want 404 with code", st, body)
	}
	if st, _ = s.files("GET", sb, "path=/tmp/up", "", nil); st != http.StatusBadRequest {
		t.Errorf("download of a directory: %d, want 400", st)
	}

	stat, err := c.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "/tmp/up/dir/big.bin"}))
	if err != nil || stat.Msg.Entry.Size != int64(len(data)) || stat.Msg.Entry.Type != fspb.FileType_FILE_TYPE_FILE || stat.Msg.Entry.Name != "big.bin" {
		t.Errorf("stat: %v %v", stat, err)
	}
	if _, err := c.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "/tmp/nope"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("stat of a missing path: %v, want NotFound", err)
	}
	if _, err := c.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "/tmp/up/new/deep"})); err != nil {
		t.Fatal(err)
	}
	if _, err := c.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: "/tmp/up/new/deep"})); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Errorf("make of an existing directory: %v, want AlreadyExists", err)
	}
	mv, err := c.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: "/tmp/up/dir/big.bin", Destination: "/tmp/up/new/moved.bin"}))
	if err != nil || mv.Msg.Entry.Path != "/tmp/up/new/moved.bin" {
		t.Fatalf("move: %v %v", mv, err)
	}
	ls, err := c.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: "/tmp/up", Depth: 2}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ls.Msg.Entries {
		names = append(names, e.Path)
	}
	if got := strings.Join(names, ","); got != "/tmp/up/dir,/tmp/up/new,/tmp/up/new/deep,/tmp/up/new/moved.bin" {
		t.Errorf("list depth 2: %s", got)
	}

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := c.fs.WatchDir(wctx, connect.NewRequest(&fspb.WatchDirRequest{Path: "/tmp/up/new"}))
	if err != nil {
		t.Fatal(err)
	}
	if !w.Receive() || w.Msg().GetStart() == nil {
		t.Fatalf("watch: no start event: %v", w.Err())
	}
	if _, err := c.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "/tmp/up/new/moved.bin"})); err != nil {
		t.Fatal(err)
	}
	if !w.Receive() || w.Msg().GetFilesystem().GetName() != "moved.bin" || w.Msg().GetFilesystem().GetType() != fspb.EventType_EVENT_TYPE_REMOVE {
		t.Errorf("watch: got %v, %v; want the removal of moved.bin", w.Msg(), w.Err())
	}
	cancel()
	if _, err := c.fs.Stat(ctx, connect.NewRequest(&fspb.StatRequest{Path: "/tmp/up/new/moved.bin"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("stat after remove: %v", err)
	}
	badInput(t, s, sb, c)

	var ce *connect.Error
	if _, err := c.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "/tmp/up/new/moved.bin"})); !errors.As(err, &ce) || ce.Code() != connect.CodeNotFound {
		t.Errorf("remove of a missing path: %v, want NotFound", err)
	}
}

// badInput: envd calls a client gets wrong, and an upload cut off midway
// (nothing of it is left in the guest).
func badInput(t *testing.T, s *apiServer, sb sandboxJSON, c envdClients) {
	ctx := testutil.Context(t, 2*time.Minute)
	if st, body := s.files("POST", sb, "path=/tmp/x", "text/plain", strings.NewReader("x")); st != http.StatusUnsupportedMediaType {
		t.Errorf("upload as text/plain: %d %s, want 415", st, body)
	}
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	fw, _ := mw.CreateFormField("other")
	if _, err := fw.Write([]byte("x")); err != nil || mw.Close() != nil {
		t.Fatal("make the form")
	}
	if st, body := s.files("POST", sb, "path=/tmp/x", mw.FormDataContentType(), &form); st != http.StatusBadRequest || !strings.Contains(string(body), "has no") {
		t.Errorf("multipart without a file part: %d %s", st, body)
	}
	if st, body := s.files("POST", sb, "", "multipart/form-data; boundary=zz", strings.NewReader("garbage")); st != http.StatusBadRequest {
		t.Errorf("malformed multipart: %d %s", st, body)
	}
	if st, body := s.files("POST", sb, "path=/tmp/x", "application/octet-stream", nil); st != http.StatusOK {
		t.Errorf("empty upload: %d %s", st, body)
	}
	if st, body := s.files("POST", sb, "path=/tmp/x", "application/octet-stream", strings.NewReader("x")); st != http.StatusOK {
		t.Errorf("upload over a file: %d %s", st, body)
	}
	req, _ := http.NewRequest("GET", s.url+"/files?path=/tmp/x", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Errorf("no E2b-Sandbox-Id: %v %v, want 400", resp, err)
	} else {
		resp.Body.Close()
	}
	req, _ = http.NewRequest("POST", s.url+"/process.Process/List", strings.NewReader("{not json"))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("E2b-Sandbox-Id", sb.SandboxID)
	req.Header.Set("X-Access-Token", sb.EnvdAccessToken)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Errorf("malformed Connect JSON: %v %v, want 400", resp, err)
	} else {
		resp.Body.Close()
	}
	if _, err := c.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: "/tmp/x"})); err == nil {
		t.Errorf("list of a file: %v, want an error", err)
	}

	// An upload whose client goes away midway leaves nothing behind.
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "POST /files?path=/tmp/cut/cut.bin HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: %s\r\nX-Access-Token: %s\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", sb.SandboxID, sb.EnvdAccessToken, 4<<20)
	if _, err := conn.Write(make([]byte, 512<<10)); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if err := testutil.Poll(time.Minute, func() bool {
		// The folder is made when the upload reaches the guest.
		ls, err := c.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: "/tmp/cut"}))
		return connect.CodeOf(err) == connect.CodeNotFound || (err == nil && len(ls.Msg.Entries) == 0)
	}); err != nil {
		if ls, err := c.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: "/tmp/cut"})); err == nil {
			t.Errorf("a cut upload left %v", ls.Msg.Entries)
		} else {
			t.Errorf("list /tmp/cut: %v", err)
		}
	}
}
