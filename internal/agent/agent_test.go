package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// The tests use the reaper exactly as PID 1 does (wait4(-1) for everything)
// by making the test binary a child subreaper: orphans of the commands under
// test are re-parented to it and reaped. Nothing in this package's tests
// uses os/exec, whose Wait the reaper would race.
var testReaper *Reaper

func TestMain(m *testing.M) {
	if err := becomeSubreaper(); err != nil {
		panic(err)
	}
	testReaper = SharedReaper(true)
	os.Exit(m.Run())
}

type testEnv struct {
	client  agentpb.AgentClient
	srv     *Server
	dir     string // default working directory
	envFile string
	profile string
	powered chan bool
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	tmp := t.TempDir()
	te := &testEnv{
		dir:     filepath.Join(tmp, "home"),
		envFile: filepath.Join(tmp, "etc", "smolvm", "env"),
		profile: filepath.Join(tmp, "etc", "profile.d", "smolvm-env.sh"),
		powered: make(chan bool, 1),
	}
	if err := os.MkdirAll(te.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(Config{
		EnvFile:         te.envFile,
		ProfileFile:     te.profile,
		MachineIDFile:   filepath.Join(tmp, "etc", "machine-id"),
		DefaultDir:      te.dir,
		ImageConfigFile: filepath.Join(tmp, "etc", "smolvm", "image.json"),
		Logger:          slog.New(slog.NewTextHandler(io.Discard, nil)),
		Reaper:          testReaper,
		PowerOff:        func(reboot bool) error { te.powered <- reboot; return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	te.srv = srv
	sock := filepath.Join(tmp, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := NewGRPCServer(srv)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	te.client = agentpb.NewAgentClient(cc)
	return te
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestPing(t *testing.T) {
	te := newTestEnv(t)
	resp, err := te.client.Ping(testCtx(t), &agentpb.PingRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.AgentVersion != Version || resp.ProtocolVersion != ProtocolVersion {
		t.Errorf("versions = %q/%d", resp.AgentVersion, resp.ProtocolVersion)
	}
	if resp.UptimeNs <= 0 || resp.Kernel == "" || resp.Hostname == "" {
		t.Errorf("incomplete ping: %v", resp)
	}
	if d := time.Since(time.Unix(0, resp.TimeUnixNs)); d < -time.Minute || d > time.Minute {
		t.Errorf("guest time off by %s", d)
	}
}

func TestShutdown(t *testing.T) {
	te := newTestEnv(t)
	if _, err := te.client.Shutdown(testCtx(t), &agentpb.ShutdownRequest{Reboot: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case reboot := <-te.powered:
		if !reboot {
			t.Error("PowerOff called with reboot=false")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("PowerOff not called")
	}
}

func TestRefresh(t *testing.T) {
	te := newTestEnv(t)
	ctx := testCtx(t)
	// Clock and hostname are left alone: the test may run as root on a host.
	_, err := te.client.Refresh(ctx, &agentpb.RefreshRequest{
		Entropy:   []byte("0123456789abcdef0123456789abcdef"),
		MachineId: "0123456789abcdef0123456789abcdef",
	})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(te.srv.cfg.MachineIDFile)
	if err != nil || string(b) != "0123456789abcdef0123456789abcdef\n" {
		t.Errorf("machine-id = %q, %v", b, err)
	}
	for _, req := range []*agentpb.RefreshRequest{
		{MachineId: "nope"},
		{Hostname: "bad host"},
		{Entropy: make([]byte, maxEntropy+1)},
	} {
		if _, err := te.client.Refresh(ctx, req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("Refresh(%v) = %v, want InvalidArgument", req, err)
		}
	}
}

func contextWithCancel(t *testing.T) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return ctx, cancel
}

func TestValidators(t *testing.T) {
	for h, want := range map[string]bool{
		"a": true, "vm-1.example": true, "A9": true, strings.Repeat("a", 64): true,
		"": false, "-a": false, "a-": false, "a.": false, "a b": false, "a_b": false, strings.Repeat("a", 65): false,
	} {
		if validHostname(h) != want {
			t.Errorf("validHostname(%q) = %v", h, !want)
		}
	}
	for id, want := range map[string]bool{
		strings.Repeat("0f", 16): true, strings.Repeat("0F", 16): false, strings.Repeat("0", 31): false, strings.Repeat("g", 32): false,
	} {
		if validMachineID(id) != want {
			t.Errorf("validMachineID(%q) = %v", id, !want)
		}
	}
	for k, want := range map[string]bool{"PATH": true, "_x1": true, "a": true, "": false, "1A": false, "A-B": false, "A=B": false} {
		if validEnvKey(k) != want {
			t.Errorf("validEnvKey(%q) = %v", k, !want)
		}
	}
}

func TestWriteMachineID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "etc", "machine-id")
	check := func(id string) {
		t.Helper()
		if err := writeMachineID(path, id); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != id+"\n" {
			t.Fatalf("after writing %s the file holds %q (%v)", id, b, err)
		}
	}
	check("00000000000000000000000000000001") // creates the folder and file
	check("00000000000000000000000000000002") // the held file, overwritten
	// Replaced behind the agent's back: the new file gets the id.
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte("00000000000000000000000000000009\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	check("00000000000000000000000000000003")
	// Grown: no tail of the old contents is left.
	if err := os.WriteFile(path, []byte("00000000000000000000000000000003\nextra\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	check("00000000000000000000000000000004")
}
