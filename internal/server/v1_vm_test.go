package server

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// createSandbox makes a sandbox through the API and deletes it when the
// test ends.
func (ts *testServer) createSandbox(body map[string]any) sandboxJSON {
	ts.t.Helper()
	var sb sandboxJSON
	ts.must(201, "POST", "/v1/sandboxes", body, &sb)
	t := ts.t
	t.Cleanup(func() {
		if err := ts.srv.Registry().Delete(context.Background(), sb.ID); err != nil && !errors.Is(err, smolvm.ErrNotFound) {
			t.Errorf("delete sandbox %s: %v", sb.ID, err)
		}
	})
	return sb
}

func (ts *testServer) run(id string, body map[string]any) execResult {
	ts.t.Helper()
	var res execResult
	ts.must(200, "POST", sbPath(id, "/exec"), body, &res)
	return res
}

// TestV1Sandbox drives one sandbox through the whole API: create with
// labels and env, list by label, get, exec (shell line and argv, env,
// cwd, stdin, exit codes, timeout), env, files (raw up and down, stat,
// list, mkdir, remove, tar both ways, an upload cut off by its client),
// ports, pause and resume, snapshots (create, list, restore into a new
// sandbox, delete), images, a restart of the server, and delete.
func TestV1Sandbox(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home, DefaultTimeout: time.Hour})
	sb := ts.createSandbox(map[string]any{"metadata": map[string]string{"app": "api-test"}, "env": map[string]string{"FOO": "bar"}, "timeout": 600})
	if sb.State != "running" || sb.Image != "base" || sb.ExpiresAt == nil || time.Until(*sb.ExpiresAt) > 11*time.Minute || sb.Metadata["app"] != "api-test" {
		t.Errorf("created: %+v", sb)
	}
	id := sb.ID

	t.Run("list", func(t *testing.T) {
		ts.t = t
		var list struct{ Sandboxes []sandboxJSON }
		ts.must(200, "GET", "/v1/sandboxes?label=app=api-test", nil, &list)
		if len(list.Sandboxes) != 1 || list.Sandboxes[0].ID != id {
			t.Errorf("by label: %+v", list)
		}
		ts.must(200, "GET", "/v1/sandboxes?label=app=other", nil, &list)
		if len(list.Sandboxes) != 0 {
			t.Errorf("by another label: %+v", list)
		}
		var got sandboxJSON
		ts.must(200, "GET", sbPath(id), nil, &got)
		if got.ID != id || got.CPUs != 1 {
			t.Errorf("get: %+v", got)
		}
	})

	t.Run("exec", func(t *testing.T) {
		ts.t = t
		res := ts.run(id, map[string]any{"command": "echo $FOO $X; pwd; echo err >&2; exit 3", "env": map[string]string{"X": "y"}, "cwd": "/tmp"})
		if res.ExitCode != 3 || res.Stdout != "bar y\n/tmp\n" || res.Stderr != "err\n" {
			t.Errorf("shell: %+v", res)
		}
		res = ts.run(id, map[string]any{"argv": []string{"cat"}, "stdin": "from stdin"})
		if res.ExitCode != 0 || res.Stdout != "from stdin" {
			t.Errorf("argv with stdin: %+v", res)
		}
		res = ts.run(id, map[string]any{"command": "head -c 5000 /dev/zero", "output_limit": 100})
		if len(res.Stdout) != 100 || !res.Truncated {
			t.Errorf("output limit: %d bytes, truncated %v", len(res.Stdout), res.Truncated)
		}
		res = ts.run(id, map[string]any{"command": "sleep 30", "timeout": 0.5})
		if !res.TimedOut {
			t.Errorf("timeout: %+v", res)
		}
		res = ts.run(id, map[string]any{"argv": []string{"/no/such/program"}})
		if res.ExitCode != 127 || !strings.Contains(res.Stderr, "/no/such/program") {
			t.Errorf("a program that does not exist: %+v", res)
		}
		ts.wantError(400, "invalid", "POST", sbPath(id, "/exec"), map[string]any{"command": "true", "cwd": "/no/such/dir"}, "/no/such/dir")
	})

	t.Run("env", func(t *testing.T) {
		ts.t = t
		var env struct{ Env map[string]string }
		ts.must(200, "PATCH", sbPath(id, "/env"), map[string]any{"set": map[string]string{"NEW": "1"}, "unset": []string{"FOO"}}, &env)
		if env.Env["NEW"] != "1" || env.Env["FOO"] != "" {
			t.Errorf("after PATCH: %v", env.Env)
		}
		if res := ts.run(id, map[string]any{"command": "echo $NEW-$FOO"}); res.Stdout != "1-\n" {
			t.Errorf("a command after PATCH: %q", res.Stdout)
		}
		ts.must(200, "GET", sbPath(id, "/env"), nil, &env)
		if env.Env["NEW"] != "1" {
			t.Errorf("GET env: %v", env.Env)
		}
	})

	t.Run("files", func(t *testing.T) {
		ts.t = t
		data := make([]byte, 3<<20+17)
		rand.Read(data)
		var wrote struct {
			Path string
			Size int64
		}
		ts.must(200, "PUT", sbPath(id, "/files?path=/tmp/up/data.bin&mode=0600"), data, &wrote)
		if wrote.Size != int64(len(data)) {
			t.Errorf("wrote %+v", wrote)
		}
		got := ts.must(200, "GET", sbPath(id, "/files?path=/tmp/up/data.bin"), nil, nil)
		if !bytes.Equal(got, data) {
			t.Errorf("read back %d bytes, not the %d written", len(got), len(data))
		}
		var fi fileJSON
		ts.must(200, "GET", sbPath(id, "/files/stat?path=/tmp/up/data.bin"), nil, &fi)
		if fi.Size != int64(len(data)) || fi.Mode != "0600" || fi.Type != "file" || fi.Name != "data.bin" {
			t.Errorf("stat: %+v", fi)
		}
		var mk struct{ Created bool }
		ts.must(200, "POST", sbPath(id, "/files/mkdir?path=/tmp/up/sub/deeper"), nil, &mk)
		if !mk.Created {
			t.Error("mkdir: not created")
		}
		var list struct{ Entries []fileJSON }
		ts.must(200, "GET", sbPath(id, "/files/list?path=/tmp/up"), nil, &list)
		if len(list.Entries) != 2 || list.Entries[0].Name != "data.bin" || list.Entries[1].Type != "dir" {
			t.Errorf("list: %+v", list.Entries)
		}
		ts.wantError(404, "not_found", "GET", sbPath(id, "/files?path=/tmp/up/none"), nil, "/tmp/up/none")
		ts.wantError(400, "invalid", "GET", sbPath(id, "/files?path=/tmp/up"), nil, "archive")

		// A tar up, merged into an existing folder, and back down.
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		for name, body := range map[string]string{"sub/a.txt": "A", "b.txt": "B"} {
			if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
				t.Fatal(err)
			}
			if _, err := tw.Write([]byte(body)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		resp := ts.send("PUT", sbPath(id, "/archive?path=/tmp/up"), bytes.NewReader(tb.Bytes()), ts.key)
		resp.Body.Close()
		if resp.StatusCode != 204 {
			t.Fatalf("put archive: %d", resp.StatusCode)
		}
		if res := ts.run(id, map[string]any{"command": "cat /tmp/up/sub/a.txt /tmp/up/b.txt; ls -A /tmp/up | tr '\\n' ' '"}); res.Stdout != "ABb.txt data.bin sub " {
			t.Errorf("after put archive: %q", res.Stdout)
		}
		tarb := ts.must(200, "GET", sbPath(id, "/archive?path=/tmp/up/sub"), nil, nil)
		names := map[string]bool{}
		tr := tar.NewReader(bytes.NewReader(tarb))
		for {
			h, err := tr.Next()
			if err != nil {
				break
			}
			names[strings.TrimSuffix(h.Name, "/")] = true
		}
		if !names["sub/a.txt"] || !names["sub/deeper"] {
			t.Errorf("get archive: %v", names)
		}

		// Uploads cut off by the client leave no file, no staging folder.
		for _, p := range []string{"/files?path=/tmp/up/cut.bin", "/archive?path=/tmp/up"} {
			cutUpload(t, ts, sbPath(id, p))
		}
		// The server ends the requests (and cleans up) soon after.
		var left string
		if err := testutil.Poll(time.Minute, func() bool {
			left = ts.run(id, map[string]any{"command": "ls -A /tmp/up | tr '\\n' ' '"}).Stdout
			return left == "b.txt data.bin sub "
		}); err != nil {
			t.Errorf("after cut uploads: %q", left)
		}
		resp = ts.send("DELETE", sbPath(id, "/files?path=/tmp/up"), nil, ts.key)
		resp.Body.Close()
		if resp.StatusCode != 204 {
			t.Errorf("remove: %d", resp.StatusCode)
		}
		ts.wantError(404, "not_found", "GET", sbPath(id, "/files/stat?path=/tmp/up"), nil)
	})

	t.Run("ports", func(t *testing.T) {
		ts.t = t
		var pf smolvm.PortForward
		ts.must(201, "POST", sbPath(id, "/ports"), map[string]string{"spec": "8080"}, &pf)
		if pf.GuestPort != 8080 || pf.HostPort == 0 || pf.HostIP != "127.0.0.1" {
			t.Errorf("expose: %+v", pf)
		}
		var list struct{ Ports []smolvm.PortForward }
		ts.must(200, "GET", sbPath(id, "/ports"), nil, &list)
		if len(list.Ports) != 1 || list.Ports[0] != pf {
			t.Errorf("ports: %+v", list)
		}
		ts.must(204, "DELETE", sbPath(id, fmt.Sprintf("/ports/%d", pf.HostPort)), nil, nil)
		ts.must(200, "GET", sbPath(id, "/ports"), nil, &list)
		if len(list.Ports) != 0 {
			t.Errorf("ports after close: %+v", list)
		}
	})

	t.Run("pause", func(t *testing.T) {
		ts.t = t
		var got sandboxJSON
		ts.must(200, "POST", sbPath(id, "/pause"), nil, &got)
		if got.State != "paused" {
			t.Errorf("pause: %+v", got)
		}
		ts.must(200, "POST", sbPath(id, "/resume"), map[string]int{"timeout": 1200}, &got)
		if got.State != "running" || got.ExpiresAt == nil || time.Until(*got.ExpiresAt) < 19*time.Minute {
			t.Errorf("resume: %+v", got)
		}
		var never sandboxJSON
		ts.must(200, "POST", sbPath(id, "/timeout"), map[string]int{"timeout": -1}, &never)
		if never.ExpiresAt != nil {
			t.Errorf("timeout -1: %+v", never)
		}
		if res := ts.run(id, map[string]any{"command": "echo back"}); res.Stdout != "back\n" {
			t.Errorf("after resume: %+v", res)
		}
	})

	t.Run("snapshots", func(t *testing.T) {
		ts.t = t
		ts.run(id, map[string]any{"command": "echo kept > /root/mark"})
		var sn smolvm.SnapshotInfo
		ts.must(201, "POST", sbPath(id, "/snapshots"), map[string]string{"name": "api-snap"}, &sn)
		defer func() {
			cleanUp(t, "delete the snapshot", testutil.OpenHost(t, home).DeleteSnapshot(context.Background(), "api-snap"))
		}()
		ts.wantError(409, "exists", "POST", sbPath(id, "/snapshots"), map[string]string{"name": "api-snap"})
		var list struct{ Snapshots []smolvm.SnapshotInfo }
		ts.must(200, "GET", "/v1/snapshots", nil, &list)
		if len(list.Snapshots) != 1 || list.Snapshots[0].Name != "api-snap" {
			t.Errorf("snapshots: %+v", list)
		}
		var clone sandboxJSON
		ts.must(201, "POST", "/v1/snapshots/api-snap/restore", map[string]any{"metadata": map[string]string{"clone": "1"}}, &clone)
		t.Cleanup(func() { cleanUp(t, "delete the clone", ts.srv.Registry().Delete(context.Background(), clone.ID)) })
		if clone.Image != "base" || clone.Metadata["clone"] != "1" {
			t.Errorf("the clone: %+v", clone)
		}
		if res := ts.run(clone.ID, map[string]any{"command": "cat /root/mark"}); res.Stdout != "kept\n" {
			t.Errorf("the clone: %+v", res)
		}
		ts.must(204, "DELETE", sbPath(clone.ID), nil, nil)
		ts.must(204, "DELETE", "/v1/snapshots/api-snap", nil, nil)
	})

	t.Run("images", func(t *testing.T) {
		ts.t = t
		var list struct{ Images []smolvm.ImageInfo }
		ts.must(200, "GET", "/v1/images", nil, &list)
		if len(list.Images) == 0 || list.Images[0].Name != smolvm.DefaultImage {
			t.Errorf("images: %+v", list)
		}
	})

	t.Run("restart", func(t *testing.T) {
		ts.t = t
		// A second server on the same folder (the first one shut down)
		// has the sandbox, and runs commands in it.
		ts.http.Close()
		if err := ts.srv.Shutdown(); err != nil {
			t.Fatal(err)
		}
		ts2 := newTestServer(t, Options{Home: home})
		var got sandboxJSON
		ts2.must(200, "GET", sbPath(id), nil, &got)
		if got.Metadata["app"] != "api-test" || got.State != "running" {
			t.Errorf("after the restart: %+v", got)
		}
		if res := ts2.run(id, map[string]any{"command": "echo $NEW"}); res.Stdout != "1\n" {
			t.Errorf("a command after the restart: %+v", res)
		}
		ts2.must(204, "DELETE", sbPath(id), nil, nil)
		ts2.wantError(404, "not_found", "GET", sbPath(id), nil)
		if _, err := testutil.OpenHost(t, home).Open(context.Background(), id); !errors.Is(err, smolvm.ErrNotFound) {
			t.Errorf("the VM after DELETE: %v", err)
		}
	})
}

// cutUpload starts an upload, sends part of it and breaks the connection.
func cutUpload(t *testing.T, ts *testServer, path string) {
	t.Helper()
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "PUT", ts.http.URL+path, pr)
	req.Header.Set("Authorization", "Bearer "+ts.key)
	req.Header.Set("Content-Type", "application/octet-stream")
	done := make(chan error, 1)
	go func() {
		resp, err := ts.http.Client().Do(req)
		if err == nil {
			resp.Body.Close()
			err = fmt.Errorf("the upload got an answer: %d", resp.StatusCode)
		}
		done <- err
	}()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	if err := tw.WriteHeader(&tar.Header{Name: "partial/big", Mode: 0o644, Size: 1 << 20, Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	// The header and part of the file.
	for _, b := range [][]byte{tb.Bytes(), make([]byte, 256<<10)} {
		if _, err := pw.Write(b); err != nil {
			t.Fatalf("the upload's first part: %v", err)
		}
	}
	cancel()
	pw.CloseWithError(errors.New("client gone"))
	// The client's error is the cancel or the broken body, whichever
	// came first; an answer would mean the server took a partial upload.
	if err := <-done; err == nil || strings.Contains(err.Error(), "got an answer") {
		t.Errorf("the cut upload: %v", err)
	}
}

// TestV1Stream: a command over a WebSocket sends its output as it comes,
// reads stdin, reports its exit; a PTY works; one client that stops
// reading does not stall another's command.
func TestV1Stream(t *testing.T) {
	home := warmHome(t)
	ts := newTestServer(t, Options{Home: home})
	sb := ts.createSandbox(map[string]any{"timeout": -1})
	ctx := testutil.Context(t, 5*time.Minute)
	dial := func() *websocket.Conn { return ts.dial(ctx, sb.ID) }
	send := func(c *websocket.Conn, v any) { wsSend(t, ctx, c, v) }
	collect := func(c *websocket.Conn) (string, string, execExit) { return wsCollect(t, ctx, c) }

	c := dial()
	send(c, map[string]any{"command": "echo one; echo two >&2; exit 7"})
	out, errOut, exit := collect(c)
	if out != "one\n" || errOut != "two\n" || exit.ExitCode != 7 {
		t.Errorf("stream: %q %q %+v", out, errOut, exit)
	}

	c = dial()
	send(c, map[string]any{"argv": []string{"sh", "-c", "read line; echo got $line; cat"}, "open_stdin": true})
	if err := c.Write(ctx, websocket.MessageBinary, []byte("hello\nrest")); err != nil {
		t.Fatal(err)
	}
	// The first line's answer comes before stdin closes: output streams.
	typ, msg, err := c.Read(ctx)
	if err != nil || typ != websocket.MessageBinary || string(msg[1:]) != "got hello\n" {
		t.Fatalf("first output: %v %q", err, msg)
	}
	send(c, map[string]string{"type": "close_stdin"})
	out, _, exit = collect(c)
	if out != "rest" || exit.ExitCode != 0 {
		t.Errorf("stdin: %q %+v", out, exit)
	}

	c = dial()
	send(c, map[string]any{"command": "tty; stty size", "tty": true, "rows": 33, "cols": 101})
	out, _, exit = collect(c)
	if !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "33 101") || exit.ExitCode != 0 {
		t.Errorf("pty: %q %+v", out, exit)
	}

	// A client that reads nothing of a command printing without end does
	// not stall another's.
	stalled := dial()
	send(stalled, map[string]any{"command": "cat /dev/zero"})
	c = dial()
	send(c, map[string]any{"command": "head -c 3000000 /dev/zero | wc -c"})
	out, _, _ = collect(c)
	if strings.TrimSpace(out) != "3000000" {
		t.Errorf("beside a stalled stream: %q", out)
	}
	stalled.CloseNow()
	// Its command is killed once its client is gone.
	if err := testutil.Poll(time.Minute, func() bool {
		res := ts.run(sb.ID, map[string]any{"command": "pgrep -x cat || true"})
		return strings.TrimSpace(res.Stdout) == ""
	}); err != nil {
		t.Errorf("the command of a client that went is still running: %v", err)
	}

	// A bad first message ends in an error message and a close.
	c = dial()
	send(c, map[string]any{"command": "true", "bogus": 1})
	_, msg, err = c.Read(ctx)
	var e apiError
	if err != nil || json.Unmarshal(msg, &e) != nil || e.Code != "invalid" || !strings.Contains(e.Message, "bogus") {
		t.Errorf("bad first message: %v %s", err, msg)
	}
}

func (ts *testServer) dial(ctx context.Context, id string) *websocket.Conn {
	ts.t.Helper()
	url := "ws" + strings.TrimPrefix(ts.http.URL, "http") + sbPath(id, "/exec/stream")
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + ts.key}}})
	if err != nil {
		ts.t.Fatal(err)
	}
	c.SetReadLimit(1 << 20)
	return c
}

func wsSend(t testing.TB, ctx context.Context, c *websocket.Conn, v any) {
	t.Helper()
	b, _ := json.Marshal(v)
	if err := c.Write(ctx, websocket.MessageText, b); err != nil {
		t.Fatal(err)
	}
}

// wsCollect reads a stream until its exit message and the close after it.
func wsCollect(t testing.TB, ctx context.Context, c *websocket.Conn) (stdout, stderr string, exit execExit) {
	t.Helper()
	var o, e bytes.Buffer
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("read: %v (stdout %q stderr %q)", err, o.String(), e.String())
		}
		if typ == websocket.MessageText {
			if err := json.Unmarshal(msg, &exit); err != nil || exit.Type != "exit" {
				t.Fatalf("text message %s", msg)
			}
			_, _, err := c.Read(ctx)
			var ce websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.StatusNormalClosure {
				t.Errorf("after the exit: %v, want a normal close", err)
			}
			return o.String(), e.String(), exit
		}
		switch msg[0] {
		case streamStdout:
			o.Write(msg[1:])
		case streamStderr:
			e.Write(msg[1:])
		}
	}
}
