package e2b

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// sdkDir holds the node test of the official e2b SDK (package.json pins
// the SDK; `npm ci` there installs it, as .ci/run does).
func sdkDir() string { return filepath.Join(testutil.RepoRoot(), "test", "e2b") }

// TestSDK runs the official e2b SDK's test script (test/e2b/sdk.test.mjs)
// against the API on a loopback port, with exactly E2B_API_KEY,
// E2B_API_URL and E2B_SANDBOX_URL set. Skipped only where node is missing.
func TestSDK(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not found: install Node.js 20 or later to run the e2b SDK test")
	}
	dir := sdkDir()
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "e2b", "package.json")); err != nil {
		t.Fatalf("the e2b SDK is not installed in %s: run 'npm ci --prefix test/e2b' (.ci/run does)", dir)
	}
	s := newAPIServer(t, 10*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "--test", "--test-reporter=spec", "sdk.test.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "E2B_API_KEY="+testKey, "E2B_API_URL="+s.url, "E2B_SANDBOX_URL="+s.url)
	out, err := cmd.CombinedOutput()
	t.Logf("node --test sdk.test.mjs:\n%s", out)
	if err != nil {
		t.Fatalf("the e2b SDK test failed: %v", err)
	}
	if m := regexp.MustCompile(`(?m)^ℹ fail (\d+)`).FindSubmatch(out); m == nil || string(m[1]) != "0" {
		t.Errorf("no summary with 0 failures in the output")
	}
}
