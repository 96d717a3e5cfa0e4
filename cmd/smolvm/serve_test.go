package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/smolvm/smolvm/internal/testutil"
)

func TestServeRefuses(t *testing.T) {
	home := t.TempDir()
	for _, c := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"serve", "--listen", "0.0.0.0:0"}, "", "not a loopback address and the server has no API key"},
		{[]string{"serve", "--listen", "nonsense"}, "", "give HOST:PORT"},
		{[]string{"serve", "--api-key-file", filepath.Join(home, "none")}, "", "--api-key-file"},
		{[]string{"serve", "--max-sandboxes", "-1"}, "", "--max-sandboxes"},
		{[]string{"serve", "--max-vms", "-2"}, "", "--max-vms -2"},
		{[]string{"serve", "--max-memory", "lots"}, "", "--max-memory"},
	} {
		r := smolvmRunWithin(t, time.Minute, home, "", c.args...)
		if r.code != 3 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("smolvm %s: exit %d, %q; want exit 3 saying %q", strings.Join(c.args, " "), r.code, r.stderr, c.want)
		}
	}
}

func TestCheckListen(t *testing.T) {
	for addr, ok := range map[string]bool{"127.0.0.1:7420": true, "[::1]:80": true, "localhost:1": true, "127.0.0.9:1": true,
		"0.0.0.0:7420": false, ":7420": false, "192.0.2.1:1": false, "[::]:1": false} {
		if err := checkListen(addr, false); (err == nil) != ok {
			t.Errorf("checkListen(%q) without a key: %v", addr, err)
		}
		if err := checkListen(addr, true); err != nil {
			t.Errorf("checkListen(%q) with a key: %v", addr, err)
		}
	}
}

// startServe runs `smolvm serve` on a free loopback port and returns its
// URL and process.
func startServe(t *testing.T, home string, env []string, args ...string) (string, *exec.Cmd, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command(testutil.Binary(t), append([]string{"serve", "--listen", "127.0.0.1:0"}, args...)...)
	cmd.Env = append(append(os.Environ(), "SMOLVM_HOME="+home), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A test that stopped the server has waited for it already: both
		// fail then, and that is fine.
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	rd := bufio.NewReader(stderr)
	line, err := rd.ReadString('\n')
	if err != nil {
		t.Fatalf("serve: %v %q", err, line)
	}
	m := regexp.MustCompile(`http://[0-9.:]+`).FindString(line)
	if m == "" {
		t.Fatalf("serve said %q", line)
	}
	t.Logf("serve: %s", strings.TrimSpace(line))
	return m, cmd, rd
}

// TestServeKey: the key from a file is required; from the environment too;
// without one the server says it is loopback only; SIGTERM ends it with
// exit 0.
func TestServeKey(t *testing.T) {
	home := t.TempDir()
	keyFile := filepath.Join(home, "key")
	if err := os.WriteFile(keyFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	get := func(url, key string) int {
		req, _ := http.NewRequest("GET", url+"/v1/sandboxes", nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode
	}
	for _, c := range []struct {
		env  []string
		args []string
	}{{nil, []string{"--api-key-file", keyFile}}, {[]string{"SMOLVM_API_KEY=s3cret"}, nil}} {
		url, cmd, _ := startServe(t, home, c.env, c.args...)
		for key, want := range map[string]int{"": 401, "wrong": 401, "s3cret2": 401, "s3cret": 200} {
			if got := get(url, key); got != want {
				t.Errorf("key %q: %d, want %d", key, got, want)
			}
		}
		sigterm(t, cmd)
		if err := cmd.Wait(); err != nil {
			t.Errorf("serve after SIGTERM: %v", err)
		}
	}
	url, cmd, _ := startServe(t, home, []string{"SMOLVM_API_KEY="})
	if got := get(url, ""); got != 200 {
		t.Errorf("no key: %d", got)
	}
	sigterm(t, cmd)
	if err := cmd.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
}

// TestServeGraceful: SIGTERM closes a running stream with 1001 (going
// away), the server exits 0, and the sandbox outlives it: a new server
// has it.
func TestServeGraceful(t *testing.T) {
	home := testutil.Home(t)
	url, cmd, _ := startServe(t, home, []string{"SMOLVM_API_KEY="})
	resp, err := http.Post(url+"/v1/sandboxes", "application/json", strings.NewReader(`{"timeout": -1}`))
	if err != nil {
		t.Fatal(err)
	}
	var sb struct{ ID string }
	err = json.NewDecoder(resp.Body).Decode(&sb)
	resp.Body.Close()
	if resp.StatusCode != 201 || err != nil {
		t.Fatalf("create: %d %v", resp.StatusCode, err)
	}
	ctx := testutil.Context(t, 3*time.Minute)
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(url, "http")+"/v1/sandboxes/"+sb.ID+"/exec/stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"command": "echo started; sleep 600"}`)); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := c.Read(ctx); err != nil || string(msg[1:]) != "started\n" {
		t.Fatalf("stream: %v %q", err, msg)
	}
	sigterm(t, cmd)
	_, _, err = c.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway {
		t.Errorf("the stream at SIGTERM: %v, want close 1001", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
	url, cmd, _ = startServe(t, home, []string{"SMOLVM_API_KEY="})
	req, _ := http.NewRequestWithContext(context.Background(), "DELETE", url+"/v1/sandboxes/"+sb.ID, nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 204 {
		t.Errorf("delete through the second server: %v %v", err, resp)
	}
	sigterm(t, cmd)
	if err := cmd.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
}

// sigterm asks the server to stop.
func sigterm(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM to serve: %v", err)
	}
}

// TestServeCapacity: serve's --max-vms holds for every API it serves, over
// $SMOLVM_MAX_VMS (the same precedence as on run and create): past it a
// /v1 create is 503 "capacity" naming the flag, an E2B create is 429 (as
// E2B answers its limit of concurrent sandboxes, a RateLimitError in its
// SDKs); neither leaves a VM behind, and once a sandbox is deleted the
// next create has room.
func TestServeCapacity(t *testing.T) {
	home := testutil.Home(t)
	// A host folder of its own: no other test's VMs count here.
	env := []string{"SMOLVM_API_KEY=", "SMOLVM_MAX_VMS=100", "SMOLVM_HOST_DIR=" + t.TempDir()}
	url, cmd, _ := startServe(t, home, env, "--max-vms", "1")
	post := func(path, body string, header ...string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest("POST", url+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	st, b := post("/v1/sandboxes", `{"timeout": -1}`)
	var sb struct{ ID string }
	if err := json.Unmarshal(b, &sb); st != 201 || err != nil {
		t.Fatalf("first create: %d %s", st, b)
	}
	st, b = post("/v1/sandboxes", `{"timeout": -1}`)
	var e struct{ Code, Message string }
	if err := json.Unmarshal(b, &e); st != 503 || err != nil || e.Code != "capacity" || !strings.Contains(e.Message, "1 of 1 VMs") || !strings.Contains(e.Message, "--max-vms") {
		t.Errorf("/v1 create past serve --max-vms 1 (with $SMOLVM_MAX_VMS=100): %d %s; want 503 capacity naming --max-vms", st, b)
	}
	st, b = post("/sandboxes", `{"templateID": "base", "timeout": 60}`)
	if st != 429 || !strings.Contains(string(b), "--max-vms") {
		t.Errorf("E2B create past serve --max-vms 1: %d %s; want 429 naming --max-vms", st, b)
	}
	if vms, err := testutil.OpenHost(t, home).List(testutil.Context(t, time.Minute)); err != nil || len(vms) != 1 {
		t.Errorf("VMs after the refused creates: %d, %v; want 1", len(vms), err)
	}
	req, _ := http.NewRequest("DELETE", url+"/v1/sandboxes/"+sb.ID, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 204 {
		t.Fatalf("delete: %v %v", err, resp)
	}
	st, b = post("/v1/sandboxes", `{"timeout": -1}`)
	if err := json.Unmarshal(b, &sb); st != 201 || err != nil {
		t.Fatalf("create after a delete made room: %d %s", st, b)
	}
	req, _ = http.NewRequest("DELETE", url+"/v1/sandboxes/"+sb.ID, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 204 {
		t.Errorf("delete: %v %v", err, resp)
	}
	sigterm(t, cmd)
	if err := cmd.Wait(); err != nil {
		t.Errorf("serve after SIGTERM: %v", err)
	}
}
