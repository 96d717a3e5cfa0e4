package mcpserver_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/mcpserver"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// connect starts a session of s over the SDK's in-memory transport and
// returns its client end.
func connect(t *testing.T, ctx context.Context, s *mcpserver.Server, copts *mcp.ClientOptions) *mcp.ClientSession {
	t.Helper()
	st, ct := mcp.NewInMemoryTransports()
	if _, err := s.MCP().Connect(ctx, st, nil); err != nil {
		t.Fatal(err)
	}
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, copts).Connect(ctx, ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs
}

// call calls a tool and decodes its structured result into out (when not
// nil). It returns the result and its text.
func call(t *testing.T, ctx context.Context, cs *mcp.ClientSession, tool string, args map[string]any, out any) (*mcp.CallToolResult, string) {
	t.Helper()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: tool, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	var text []string
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			text = append(text, tc.Text)
		}
	}
	if out != nil && res.StructuredContent != nil {
		b, _ := json.Marshal(res.StructuredContent)
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s: decode %s: %v", tool, b, err)
		}
	}
	return res, strings.Join(text, "\n")
}

// mustCall is call that fails the test on a tool error.
func mustCall(t *testing.T, ctx context.Context, cs *mcp.ClientSession, tool string, args map[string]any, out any) {
	t.Helper()
	if res, text := call(t, ctx, cs, tool, args, out); res.IsError {
		t.Fatalf("%s %v: tool error: %s", tool, args, text)
	}
}

// wantError calls a tool that must fail with a message containing each of
// hints (what to do next).
func wantError(t *testing.T, ctx context.Context, cs *mcp.ClientSession, tool string, args map[string]any, hints ...string) string {
	t.Helper()
	res, text := call(t, ctx, cs, tool, args, nil)
	if !res.IsError {
		t.Fatalf("%s %v: no error, got %s", tool, args, text)
	}
	for _, h := range hints {
		if !strings.Contains(text, h) {
			t.Errorf("%s %v: error %q does not say %q", tool, args, text, h)
		}
	}
	return text
}

type runOut struct {
	SandboxID  string `json:"sandbox_id"`
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	ExitCode   int    `json:"exit_code"`
	TimedOut   bool   `json:"timed_out"`
	Truncated  bool   `json:"truncated"`
	DurationMS int64  `json:"duration_ms"`
}

type sandboxOut struct {
	SandboxID string `json:"sandbox_id"`
	Name      string `json:"name"`
	State     string `json:"state"`
	Session   bool   `json:"session"`
	Keep      bool   `json:"keep"`
}

// TestTools drives every tool through the SDK's client against real
// guests, sharing one sandbox where it can.
func TestTools(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 15*time.Minute)
	s := mcpserver.New(mcpserver.Options{Home: home, SupervisorBinary: testutil.Binary(t), ProgressInterval: 100 * time.Millisecond})
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	var progress atomic.Int32
	cs := connect(t, ctx, s, &mcp.ClientOptions{ProgressNotificationHandler: func(context.Context, *mcp.ProgressNotificationClientRequest) {
		progress.Add(1)
	}})

	tools, err := cs.ListTools(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tool := range tools.Tools {
		names = append(names, tool.Name)
		if tool.Description == "" || tool.OutputSchema == nil {
			t.Errorf("tool %s: no description or output schema", tool.Name)
		}
	}
	for _, want := range []string{"create_sandbox", "run_command", "write_file", "read_file", "list_files", "list_sandboxes", "delete_sandbox", "expose_port", "snapshot_sandbox"} {
		if !slices.Contains(names, want) {
			t.Errorf("tool %s missing from %v", want, names)
		}
	}

	var sb sandboxOut
	mustCall(t, ctx, cs, "create_sandbox", map[string]any{"env": map[string]string{"GREETING": "hi"}}, &sb)
	if sb.SandboxID == "" || !sb.Session || sb.State != "running" {
		t.Fatalf("create_sandbox: %+v", sb)
	}
	id := sb.SandboxID
	run := func(t *testing.T, args map[string]any) runOut {
		t.Helper()
		args["sandbox_id"] = id
		var out runOut
		mustCall(t, ctx, cs, "run_command", args, &out)
		return out
	}

	t.Run("run", func(t *testing.T) {
		out := run(t, map[string]any{"command": "echo $GREETING $X; pwd; echo err >&2; exit 3", "env": map[string]string{"X": "there"}, "cwd": "/tmp"})
		if out.Stdout != "hi there\n/tmp\n" || out.Stderr != "err\n" || out.ExitCode != 3 || out.TimedOut || out.Truncated || out.SandboxID != id {
			t.Errorf("run: %+v", out)
		}
		out = run(t, map[string]any{"command": "tr a-z A-Z", "stdin": "shout\n"})
		if out.Stdout != "SHOUT\n" {
			t.Errorf("stdin: %+v", out)
		}
		wantError(t, ctx, cs, "run_command", map[string]any{"sandbox_id": id, "command": "true", "cwd": "/no/such/dir"}, "could not start")
	})

	t.Run("caps", func(t *testing.T) {
		out := run(t, map[string]any{"command": "head -c 200000 /dev/zero | tr '\\0' a; head -c 100000 /dev/zero | tr '\\0' b >&2"})
		if len(out.Stdout) != mcpserver.DefaultOutputLimit || len(out.Stderr) != mcpserver.DefaultOutputLimit || !out.Truncated {
			t.Errorf("caps: stdout %d bytes, stderr %d, truncated %v; want %d each, truncated", len(out.Stdout), len(out.Stderr), out.Truncated, mcpserver.DefaultOutputLimit)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		var out runOut
		res, text := call(t, ctx, cs, "run_command", map[string]any{"sandbox_id": id, "command": "echo started; sleep 60", "timeout_s": 1}, &out)
		if !res.IsError || !out.TimedOut || out.ExitCode != -1 || out.Stdout != "started\n" || !strings.Contains(text, "timeout_s") {
			t.Errorf("timeout: isError %v, %+v, %q", res.IsError, out, text)
		}
		wantError(t, ctx, cs, "run_command", map[string]any{"sandbox_id": id, "command": "true", "timeout_s": 999999}, "timeout_s")
	})

	t.Run("progress", func(t *testing.T) {
		before := progress.Load()
		params := &mcp.CallToolParams{Name: "run_command", Arguments: map[string]any{"sandbox_id": id, "command": "sleep 1"}}
		params.SetProgressToken("p1")
		if res, err := cs.CallTool(ctx, params); err != nil || res.IsError {
			t.Fatalf("run with a progress token: %v %+v", err, res)
		}
		if progress.Load() == before {
			t.Error("no progress notification during a 1 s command (interval 100 ms)")
		}
	})

	t.Run("cancel", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			_, err := cs.CallTool(cctx, &mcp.CallToolParams{Name: "run_command", Arguments: map[string]any{"sandbox_id": id, "command": "echo $$ > /tmp/cancel.pid; exec sleep 600", "timeout_s": 600}})
			done <- err
		}()
		if err := testutil.Poll(time.Minute, func() bool {
			res, _ := call(t, ctx, cs, "read_file", map[string]any{"sandbox_id": id, "path": "/tmp/cancel.pid"}, nil)
			return !res.IsError
		}); err != nil {
			t.Fatal("the command never started:", err)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled call: %v", err)
		}
		if err := testutil.Poll(time.Minute, func() bool {
			out := run(t, map[string]any{"command": "kill -0 $(cat /tmp/cancel.pid) 2>/dev/null && echo alive || echo gone"})
			return out.Stdout == "gone\n"
		}); err != nil {
			t.Error("the guest process of a cancelled call is still alive:", err)
		}
	})

	t.Run("files", func(t *testing.T) {
		var w struct{ Bytes int64 }
		mustCall(t, ctx, cs, "write_file", map[string]any{"sandbox_id": id, "path": "/root/new/dir/hello.txt", "content": "héllo\n"}, &w)
		if w.Bytes != int64(len("héllo\n")) {
			t.Errorf("write_file: %+v", w)
		}
		var r struct{ Content, Encoding string }
		mustCall(t, ctx, cs, "read_file", map[string]any{"sandbox_id": id, "path": "/root/new/dir/hello.txt"}, &r)
		if r.Content != "héllo\n" || r.Encoding != "utf8" {
			t.Errorf("read_file: %+v", r)
		}
		bin := []byte{0, 1, 2, 0xff, 0xfe}
		mustCall(t, ctx, cs, "write_file", map[string]any{"sandbox_id": id, "path": "/root/bin.dat", "content": base64.StdEncoding.EncodeToString(bin), "encoding": "base64"}, nil)
		mustCall(t, ctx, cs, "read_file", map[string]any{"sandbox_id": id, "path": "/root/bin.dat"}, &r)
		if got, _ := base64.StdEncoding.DecodeString(r.Content); r.Encoding != "base64" || string(got) != string(bin) {
			t.Errorf("read_file of binary: %+v", r)
		}
		if out := run(t, map[string]any{"command": "cat /root/new/dir/hello.txt"}); out.Stdout != "héllo\n" {
			t.Errorf("the written file in the guest: %+v", out)
		}
		var l struct {
			Entries []struct{ Name, Type string }
		}
		mustCall(t, ctx, cs, "list_files", map[string]any{"sandbox_id": id, "path": "/root"}, &l)
		types := map[string]string{}
		for _, e := range l.Entries {
			types[e.Name] = e.Type
		}
		if types["new"] != "dir" || types["bin.dat"] != "file" {
			t.Errorf("list_files /root: %+v", l.Entries)
		}
		wantError(t, ctx, cs, "read_file", map[string]any{"sandbox_id": id, "path": "/root/missing.txt"}, "no such file", "list_files")
		wantError(t, ctx, cs, "list_files", map[string]any{"sandbox_id": id, "path": "/root/missing"}, "no such file")
		wantError(t, ctx, cs, "read_file", map[string]any{"sandbox_id": id, "path": "/root"}, "list_files")
		wantError(t, ctx, cs, "write_file", map[string]any{"sandbox_id": id, "path": "relative.txt", "content": "x"}, "absolute")
		wantError(t, ctx, cs, "write_file", map[string]any{"sandbox_id": id, "path": "/root/x", "content": "%%%", "encoding": "base64"}, "base64")
	})

	t.Run("unknown sandbox", func(t *testing.T) {
		for tool, args := range map[string]map[string]any{
			"run_command": {"command": "true"}, "read_file": {"path": "/x"}, "write_file": {"path": "/x", "content": ""},
			"list_files": {"path": "/"}, "delete_sandbox": {}, "expose_port": {"port": 80}, "snapshot_sandbox": {"name": "x"},
		} {
			args["sandbox_id"] = "nope"
			wantError(t, ctx, cs, tool, args, "no sandbox", "list_sandboxes")
		}
	})

	t.Run("expose_port", func(t *testing.T) {
		// A one-request HTTP server in the guest, on busybox nc.
		run(t, map[string]any{"command": "printf 'HTTP/1.0 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nhello' > /tmp/resp; (nc -l -p 8080 < /tmp/resp > /dev/null 2>&1 &)"})
		var e struct{ URL string }
		mustCall(t, ctx, cs, "expose_port", map[string]any{"sandbox_id": id, "port": 8080}, &e)
		if !strings.HasPrefix(e.URL, "http://127.0.0.1:") {
			t.Fatalf("expose_port: %+v", e)
		}
		var body string
		if err := testutil.Poll(30*time.Second, func() bool {
			resp, err := http.Get(e.URL)
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			body = string(b)
			return true
		}); err != nil || body != "hello" {
			t.Errorf("GET %s: %q, %v", e.URL, body, err)
		}
	})

	t.Run("resources", func(t *testing.T) {
		res, err := cs.ReadResource(ctx, &mcp.ReadResourceParams{URI: "smolvm://sandboxes"})
		if err != nil || len(res.Contents) != 1 || !strings.Contains(res.Contents[0].Text, id) {
			t.Errorf("smolvm://sandboxes: %v %+v", err, res)
		}
		run(t, map[string]any{"command": "echo console-marker > /dev/console"})
		if err := testutil.Poll(30*time.Second, func() bool {
			res, err = cs.ReadResource(ctx, &mcp.ReadResourceParams{URI: "smolvm://sandboxes/" + id + "/console"})
			return err == nil && len(res.Contents) == 1 && strings.Contains(res.Contents[0].Text, "console-marker")
		}); err != nil {
			t.Errorf("console of %s: %v %+v", id, err, res)
		}
		if _, err := cs.ReadResource(ctx, &mcp.ReadResourceParams{URI: "smolvm://sandboxes/nope/console"}); err == nil {
			t.Error("console of an unknown sandbox: no error")
		}
		tmpl, err := cs.ListResourceTemplates(ctx, nil)
		if err != nil || len(tmpl.ResourceTemplates) != 1 {
			t.Errorf("resource templates: %v %+v", err, tmpl)
		}
	})

	t.Run("snapshot", func(t *testing.T) {
		run(t, map[string]any{"command": "echo saved > /root/state"})
		var sn struct{ Snapshot string }
		mustCall(t, ctx, cs, "snapshot_sandbox", map[string]any{"sandbox_id": id, "name": "mcp-test"}, &sn)
		h := testutil.OpenHost(t, home)
		t.Cleanup(func() { _ = h.DeleteSnapshot(context.Background(), "mcp-test") })
		wantError(t, ctx, cs, "snapshot_sandbox", map[string]any{"sandbox_id": id, "name": "mcp-test"}, "another name")
		var clone sandboxOut
		mustCall(t, ctx, cs, "create_sandbox", map[string]any{"snapshot": "mcp-test"}, &clone)
		var out runOut
		mustCall(t, ctx, cs, "run_command", map[string]any{"sandbox_id": clone.SandboxID, "command": "cat /root/state"}, &out)
		if out.Stdout != "saved\n" {
			t.Errorf("clone from the snapshot: %+v", out)
		}
		mustCall(t, ctx, cs, "delete_sandbox", map[string]any{"sandbox_id": clone.SandboxID}, nil)
		wantError(t, ctx, cs, "create_sandbox", map[string]any{"snapshot": "no-such-snapshot"}, "snapshot_sandbox")
	})

	t.Run("one-shot", func(t *testing.T) {
		before := vmIDs(t, home)
		var out runOut
		mustCall(t, ctx, cs, "run_command", map[string]any{"command": "echo one-shot; hostname"}, &out)
		if !strings.HasPrefix(out.Stdout, "one-shot\n") || out.SandboxID != "" {
			t.Errorf("one-shot: %+v", out)
		}
		// Its sandbox is deleted after the answer.
		if err := testutil.Poll(time.Minute, func() bool { return slices.Equal(before, vmIDs(t, home)) }); err != nil {
			t.Errorf("VMs before a one-shot run %v, after %v: its sandbox was left", before, vmIDs(t, home))
		}
	})

	t.Run("not made through MCP", func(t *testing.T) {
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Name: "users-own"})
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		var out runOut
		mustCall(t, ctx, cs, "run_command", map[string]any{"sandbox_id": "users-own", "command": "echo usable"}, &out)
		if out.Stdout != "usable\n" {
			t.Errorf("run in a VM not made through MCP: %+v", out)
		}
		wantError(t, ctx, cs, "delete_sandbox", map[string]any{"sandbox_id": "users-own"}, "smolvm rm users-own")
		if _, err := vm.Ping(ctx); err != nil {
			t.Errorf("the VM after delete_sandbox was refused: %v", err)
		}
	})

	t.Run("list and delete", func(t *testing.T) {
		var l struct{ Sandboxes []sandboxOut }
		mustCall(t, ctx, cs, "list_sandboxes", nil, &l)
		if len(l.Sandboxes) != 1 || l.Sandboxes[0].SandboxID != id || !l.Sandboxes[0].Session {
			t.Errorf("list_sandboxes: %+v", l.Sandboxes)
		}
		mustCall(t, ctx, cs, "delete_sandbox", map[string]any{"sandbox_id": id}, nil)
		wantError(t, ctx, cs, "run_command", map[string]any{"sandbox_id": id, "command": "true"}, "list_sandboxes")
		if ids := vmIDs(t, home); len(ids) != 0 {
			t.Errorf("VMs left after delete_sandbox: %v", ids)
		}
	})
}

// vmIDs lists the VMs of home.
func vmIDs(t *testing.T, home string) []string {
	t.Helper()
	infos, err := testutil.OpenHost(t, home).List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, i := range infos {
		ids = append(ids, i.ID)
	}
	slices.Sort(ids)
	return ids
}

// TestSessionEnd: the sandboxes a session made go when it ends, those made
// with keep stay; over stdio (a pipe closed) and over HTTP (the client
// deletes its session), with the bearer key checked.
func TestSessionEnd(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	s := mcpserver.New(mcpserver.Options{Home: home, SupervisorBinary: testutil.Binary(t), APIKey: "sekrit"})
	t.Cleanup(func() { _ = s.Close() })

	check := func(t *testing.T, cs *mcp.ClientSession, end func()) {
		var gone, kept sandboxOut
		mustCall(t, ctx, cs, "create_sandbox", nil, &gone)
		mustCall(t, ctx, cs, "create_sandbox", map[string]any{"keep": true}, &kept)
		if !gone.Session || kept.Session || !kept.Keep {
			t.Errorf("session %+v, kept %+v", gone, kept)
		}
		end()
		if err := testutil.Poll(time.Minute, func() bool {
			return slices.Equal(vmIDs(t, home), []string{kept.SandboxID})
		}); err != nil {
			t.Errorf("after the session ended: VMs %v, want only the kept %s", vmIDs(t, home), kept.SandboxID)
		}
		vm, err := testutil.OpenHost(t, home).Open(ctx, kept.SandboxID)
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Delete(ctx); err != nil {
			t.Error(err)
		}
		vm.Close()
	}

	t.Run("stdio", func(t *testing.T) {
		sr, cw := io.Pipe()
		cr, sw := io.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.RunStdio(ctx, sr, sw) }()
		cs, err := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil).Connect(ctx, &mcp.IOTransport{Reader: cr, Writer: cw}, nil)
		if err != nil {
			t.Fatal(err)
		}
		check(t, cs, func() {
			_ = cs.Close()
			if err := <-done; err != nil {
				t.Errorf("RunStdio: %v", err)
			}
		})
	})

	t.Run("http", func(t *testing.T) {
		srv := httptest.NewServer(s.Handler())
		defer srv.Close()
		client := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		if _, err := client.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: srv.URL}, nil); err == nil {
			t.Error("connect without the key: no error")
		}
		hc := &http.Client{Transport: bearer{"sekrit"}}
		cs, err := client.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: srv.URL, HTTPClient: hc}, nil)
		if err != nil {
			t.Fatal(err)
		}
		check(t, cs, func() { _ = cs.Close() }) // DELETE of the session
	})
}

// TestSessionIdle: an HTTP session idle past SessionTimeout ends, and its
// sandboxes go with it.
func TestSessionIdle(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	s := mcpserver.New(mcpserver.Options{Home: home, SupervisorBinary: testutil.Binary(t), SessionTimeout: 2 * time.Second})
	t.Cleanup(func() { _ = s.Close() })
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil).Connect(ctx, &mcp.StreamableClientTransport{Endpoint: srv.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cs.Close() }()
	var sb sandboxOut
	mustCall(t, ctx, cs, "create_sandbox", nil, &sb)
	if err := testutil.Poll(time.Minute, func() bool { return len(vmIDs(t, home)) == 0 }); err != nil {
		t.Errorf("sandbox %s of an idle session still there: %v", sb.SandboxID, vmIDs(t, home))
	}
}

type bearer struct{ key string }

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.key)
	return http.DefaultTransport.RoundTrip(r)
}
