package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestSupervisorRunsVM: a persistent VM whose smolvm binary has
// smolvm-supervisor beside it (as make build leaves them) runs under that
// program, built as make build builds it, and works through it: a
// command on the fast lane, one through the gRPC proxy (stdin), a stop
// that ends the process. Without the program beside it, the smolvm
// binary's own __supervise command still runs the VM.
func TestSupervisorRunsVM(t *testing.T) {
	home := testutil.Home(t)
	cli := testutil.Binary(t)
	dir := t.TempDir()
	sup := filepath.Join(dir, "smolvm-supervisor")
	build := exec.Command("go", "build", "-trimpath", "-tags", "grpcnotrace", "-o", sup, "./cmd/smolvm-supervisor")
	build.Dir = testutil.RepoRoot()
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	withSup := filepath.Join(dir, "smolvm")
	if err := os.Symlink(cli, withSup); err != nil {
		t.Fatal(err)
	}
	// A copy: a link would lead the lookup to the folder of the file it
	// points to, which has smolvm-supervisor beside it after make build.
	alone := filepath.Join(t.TempDir(), "smolvm")
	copyFile(t, cli, alone)

	for _, c := range []struct{ bin, want string }{{withSup, sup}, {alone, alone}} {
		ctx := testutil.Context(t, 2*testutil.BootTimeout)
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Persistent: true, SupervisorBinary: c.bin, BootTimeout: testutil.BootTimeout})
		if err != nil {
			t.Fatalf("New with %s: %v", c.bin, err)
		}
		info, err := vm.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pid := info.SupervisorPID
		exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "exe"))
		if err != nil {
			t.Fatalf("supervisor %d: %v", pid, err)
		}
		if exe != c.want {
			t.Errorf("with %s the supervisor (pid %d) runs %s, want %s", c.bin, pid, exe, c.want)
		}
		res, err := vm.Run(ctx, "echo fast")
		if err != nil || strings.TrimSpace(string(res.Stdout)) != "fast" {
			t.Errorf("Run: %v %+v", err, res)
		}
		res, err = vm.Run(ctx, "cat", smolvm.WithStdin(strings.NewReader("proxied")))
		if err != nil || string(res.Stdout) != "proxied" {
			t.Errorf("Run with stdin: %v %+v", err, res)
		}
		if err := vm.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
		if err := testutil.Poll(time.Minute, func() bool { return !testutil.PidAlive(pid) }); err != nil {
			t.Errorf("supervisor %d still runs after Stop: %v", pid, err)
		}
		if err := vm.Delete(ctx); err != nil {
			t.Errorf("Delete: %v", err)
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}
