package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
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

	"github.com/smolvm/smolvm/internal/testutil"
)

// TestReserveStdout: once 'smolvm mcp' took stdout for the protocol, what
// this process or a child writes to stdout lands on stderr.
func TestReserveStdout(t *testing.T) {
	if os.Getenv("SMOLVM_TEST_RESERVE_STDOUT") == "1" {
		out, err := reserveStdout()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("leak from this process")
		cmd := exec.Command("sh", "-c", "echo leak from a child; echo child stderr >&2")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		_ = cmd.Run()
		_ = exec.Command("sh", "-c", "echo leak from a child that inherits fd 1 >&1").Run()
		fmt.Fprintln(out, `{"jsonrpc":"2.0"}`)
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestReserveStdout$")
	cmd.Env = append(os.Environ(), "SMOLVM_TEST_RESERVE_STDOUT=1")
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helper: %v: %s", err, stderr.String())
	}
	if stdout.String() != "{\"jsonrpc\":\"2.0\"}\n" {
		t.Errorf("stdout %q: want the protocol line alone", stdout.String())
	}
	if !strings.Contains(stderr.String(), "leak from this process") || !strings.Contains(stderr.String(), "leak from a child") {
		t.Errorf("stderr %q: want what went to fd 1", stderr.String())
	}
}

// TestTypeScriptClient drives 'smolvm mcp' with the official TypeScript
// MCP client (test/mcp/client.mjs), over stdio and over HTTP ('smolvm mcp
// --http' and /mcp of 'smolvm serve', both behind a key), and checks that
// no VM is left.
func TestTypeScriptClient(t *testing.T) {
	const mcpKey = "test-key"
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not found: install Node.js to run the TypeScript MCP client")
	}
	home := testutil.Home(t) // skips with -short
	dir := filepath.Join(testutil.RepoRoot(), "test", "mcp")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "@modelcontextprotocol", "sdk")); err != nil {
		t.Fatalf("the TypeScript MCP SDK is not installed: run 'npm ci' in %s (.ci/run does)", dir)
	}
	bin := testutil.Binary(t)
	env := append(os.Environ(), "SMOLVM_HOME="+home, "SMOLVM_API_KEY="+mcpKey)

	runNode := func(t *testing.T, args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, node, append([]string{"client.mjs"}, args...)...)
		cmd.Dir, cmd.Env = dir, env
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		t.Logf("node client.mjs %s:\nstderr:\n%s\nsummary: %s", strings.Join(args, " "), stderr.String(), stdout.String())
		if err != nil {
			t.Fatalf("node client.mjs %s: %v", strings.Join(args, " "), err)
		}
		var sum struct{ Passed, Failed int }
		if err := json.Unmarshal([]byte(stdout.String()), &sum); err != nil || sum.Failed != 0 || sum.Passed < 6 {
			t.Errorf("summary %q: %v", stdout.String(), err)
		}
	}
	noVMs := func(t *testing.T) {
		t.Helper()
		if vms := listVMs(t, home); len(vms) != 0 {
			t.Errorf("VMs left: %+v", vms)
		}
	}

	t.Run("stdio", func(t *testing.T) {
		runNode(t, "stdio", bin, "mcp")
		noVMs(t)
	})

	// Over HTTP, from 'smolvm mcp --http' and from 'smolvm serve' (its
	// /mcp, behind the server's key); either stops on SIGTERM.
	httpClient := func(t *testing.T, url string, srv *exec.Cmd) {
		t.Helper()
		resp, err := http.Post(url, "application/json", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s without the key: %d, want 401", url, resp.StatusCode)
		}
		runNode(t, "http", url)
		if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := srv.Wait(); err != nil {
			t.Errorf("%s after SIGTERM: %v", strings.Join(srv.Args, " "), err)
		}
		noVMs(t)
	}

	t.Run("http", func(t *testing.T) {
		srv := exec.Command(bin, "mcp", "--http", "127.0.0.1:0")
		srv.Env = env
		errPipe, err := srv.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		lines := bufio.NewScanner(errPipe)
		url := ""
		re := regexp.MustCompile(`serving MCP at (http://\S+/mcp)`)
		for url == "" && lines.Scan() {
			if m := re.FindStringSubmatch(lines.Text()); m != nil {
				url = m[1]
			}
		}
		if url == "" {
			t.Fatal("smolvm mcp --http never said where it listens")
		}
		go func() { _, _ = io.Copy(io.Discard, errPipe) }()
		httpClient(t, url, srv)
	})

	t.Run("serve", func(t *testing.T) {
		url, srv, rest := startServe(t, home, []string{"SMOLVM_API_KEY=" + mcpKey})
		go func() { _, _ = io.Copy(io.Discard, rest) }()
		httpClient(t, url+"/mcp", srv)
	})
}

// TestMCPHTTPNeedsKey: a non-loopback address without a key is refused.
func TestMCPHTTPNeedsKey(t *testing.T) {
	t.Setenv("SMOLVM_API_KEY", "")
	r := smolvmRunWithin(t, time.Minute, t.TempDir(), "", "mcp", "--http", "0.0.0.0:0")
	if r.code != 3 || !strings.Contains(r.stderr, "SMOLVM_API_KEY") {
		t.Errorf("mcp --http 0.0.0.0:0 without a key: exit %d, %q; want exit 3 naming the key", r.code, r.stderr)
	}
}
