package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestMain removes what the helpers built and the VMs the tests left.
func TestMain(m *testing.M) { testutil.Main(m) }

// TestLinksNoSurface keeps the supervisor binary what it is for: the
// engine and its supervisor, without the CLI, the servers (HTTP, MCP,
// E2B) and the libraries only they use. Each of these costs every idle
// VM's supervisor its package initialisation and data, paid again per VM
// (docs/benchmarks.md); gRPC's request tracing and cgo are left out as in
// the guest agent's build (make build).
func TestLinksNoSurface(t *testing.T) {
	const mod = "github.com/smolvm/smolvm"
	cmd := exec.Command("go", "list", "-tags", "grpcnotrace", "-deps", "./cmd/smolvm-supervisor")
	cmd.Dir = testutil.RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	// Each is banned with the packages below it; the library's root
	// package (every surface's way in) alone.
	banned := []string{
		mod + "/cmd/smolvm", mod + "/bench", mod + "/internal/server", mod + "/internal/mcpserver", mod + "/internal/e2b",
		"github.com/spf13/cobra", "github.com/getkin/kin-openapi", "github.com/modelcontextprotocol/go-sdk",
		"github.com/santhosh-tekuri/jsonschema", "github.com/google/jsonschema-go", "connectrpc.com/connect",
		"github.com/chromedp", "net/http/pprof", "golang.org/x/net/trace", "html/template", "runtime/cgo",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 100 {
		t.Fatalf("go list -deps gave %d packages: %q", len(deps), out)
	}
	for _, p := range deps {
		if p == mod {
			t.Errorf("smolvm-supervisor links the library's API (%s): the supervisor needs internal/engine alone", p)
		}
		for _, b := range banned {
			if p == b || strings.HasPrefix(p, b+"/") {
				t.Errorf("smolvm-supervisor links %s: keep what only the CLI and its servers need out of internal/engine and internal/supervisor", p)
			}
		}
	}
}

// TestRunNeedsTheCommand: run by hand, without the library's arguments,
// the program says what it is for and exits 3 (ErrInvalid), like the
// CLI's hidden command.
func TestRunNeedsTheCommand(t *testing.T) {
	for _, args := range [][]string{nil, {"create"}, {"__supervise"}, {"__supervise", "x", "--bogus"}} {
		err := run(context.Background(), args)
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("run(%q) = %v, want ErrInvalid", args, err)
		}
	}
}
