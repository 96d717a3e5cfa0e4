package e2b

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/smolvm/smolvm/internal/e2b/proto/process"
	"github.com/smolvm/smolvm/internal/testutil"
)

// sdkDir holds the node test of the official e2b SDK (package.json pins
// the SDK; `npm ci` there installs it, as .ci/run does).
func sdkDir() string { return filepath.Join(testutil.RepoRoot(), "test", "e2b") }

// TestSDK runs the official e2b SDK's test script (test/e2b/sdk.test.mjs)
// against `smolvm serve` on a loopback port, with exactly E2B_API_KEY,
// E2B_API_URL and E2B_SANDBOX_URL set. Skipped only where node is missing.
func TestSDK(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not found: install Node.js 20 or later to run the e2b SDK test")
	}
	testutil.NeedQEMU(t)
	dir := sdkDir()
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "e2b", "package.json")); err != nil {
		t.Fatalf("the e2b SDK is not installed in %s: run 'npm ci --prefix test/e2b' (.ci/run does)", dir)
	}
	url := startServe(t, warmHome(t))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "--test", "--test-reporter=spec", "sdk.test.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "E2B_API_KEY="+testKey, "E2B_API_URL="+url, "E2B_SANDBOX_URL="+url)
	out, err := cmd.CombinedOutput()
	t.Logf("node --test sdk.test.mjs:\n%s", out)
	if err != nil {
		t.Fatalf("the e2b SDK test failed: %v", err)
	}
	if m := regexp.MustCompile(`(?m)^ℹ fail (\d+)`).FindSubmatch(out); m == nil || string(m[1]) != "0" {
		t.Errorf("no summary with 0 failures in the output")
	}
}

// startServe runs `smolvm serve` on a free loopback port with the test's
// key, until the test ends (SIGTERM, then its exit awaited).
func startServe(t *testing.T, home string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var log testutil.SyncBuffer
	cmd := exec.Command(testutil.Binary(t), "serve", "--listen", addr, "--default-timeout", "10m")
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home, "SMOLVM_API_KEY="+testKey)
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM) // an exited server shows below
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("smolvm serve ended with %v after SIGTERM:\n%s", err, log.String())
			}
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
			t.Errorf("smolvm serve still running a minute after SIGTERM:\n%s", log.String())
		}
	})
	url := "http://" + addr
	if err := testutil.Poll(time.Minute, func() bool {
		req, _ := http.NewRequest("GET", url+"/v2/sandboxes", nil)
		req.Header.Set("X-API-Key", testKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}); err != nil {
		t.Fatalf("smolvm serve on %s did not answer: %v\n%s", addr, err, log.String())
	}
	return url
}

// BenchmarkSDK times the e2b SDK against the API (test/e2b/bench.mjs:
// Sandbox.create(), create → first output, commands.run('true')) and, in
// the same run, the same command on the e2b path from Go (envd's Start of
// /bin/bash -l -c true) and through the library (vm.Run). Medians, in ms:
//
//	go test -run '^$' -bench SDK -benchtime 1x ./internal/e2b/
func BenchmarkSDK(b *testing.B) {
	node, err := exec.LookPath("node")
	if err != nil {
		b.Skip("node not found")
	}
	s := newAPIServer(b, 10*time.Minute)
	for b.Loop() {
		cmd := exec.Command(node, "bench.mjs")
		cmd.Dir = sdkDir()
		cmd.Env = append(os.Environ(), "E2B_API_KEY="+testKey, "E2B_API_URL="+s.url, "E2B_SANDBOX_URL="+s.url)
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			b.Fatalf("bench.mjs: %v\n%s", err, out)
		}
		var res map[string][]float64
		if err := json.Unmarshal(out, &res); err != nil {
			b.Fatalf("bench.mjs said %q: %v", out, err)
		}
		for _, k := range []string{"create_ms", "first_output_ms", "command_ms", "concurrent_wall_ms", "concurrent_failures"} {
			b.ReportMetric(median(res[k]), "sdk_"+k)
		}

		sb := s.create(map[string]any{"timeout": 600})
		c := s.envd(sb)
		ctx := context.Background()
		var viaEnvd, viaRun []float64
		vm, err := s.reg.VM(ctx, sb.SandboxID)
		if err != nil {
			b.Fatal(err)
		}
		for range 50 {
			t0 := time.Now()
			st, err := c.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: bash("true")}))
			if err != nil {
				b.Fatal(err)
			}
			for st.Receive() {
			}
			viaEnvd = append(viaEnvd, ms(time.Since(t0)))
			t0 = time.Now()
			if _, err := vm.Run(ctx, "true"); err != nil {
				b.Fatal(err)
			}
			viaRun = append(viaRun, ms(time.Since(t0)))
		}
		b.ReportMetric(median(viaEnvd), "envd_bash_true_ms")
		b.ReportMetric(median(viaRun), "vm_run_true_ms")
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}
