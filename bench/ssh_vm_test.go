package bench

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// sshTestRuns is how many timed calls the real-VM SSH tests make (after the
// warm-up call): enough to see the loop work, few under emulation.
const sshTestRuns = 3

// needSSHTools skips a test on a host without dropbear-bin; under $CI it
// fails instead, so that CI never skips the SSH path silently.
func needSSHTools(t *testing.T) {
	t.Helper()
	if _, err := findSSHTools(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%v; CI is set: the SSH comparison must run in CI", err)
		}
		t.Skipf("SSH comparison not testable here: %v", err)
	}
}

// testLogger writes the bench's warnings into the test log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// checkSSHResult checks the measurement's shape (never its figures) and
// that the guest and the VM's forwards are as before.
func checkSSHResult(t *testing.T, ctx context.Context, vm *smolvm.VM, res *SSHResult, transport string) {
	t.Helper()
	if res.Skipped != "" {
		t.Fatalf("SSH comparison skipped: %s", res.Skipped)
	}
	if res.Transport != transport || res.Runs != sshTestRuns || res.True.N != sshTestRuns || res.True.Min <= 0 || res.True.Median < res.True.Min {
		t.Fatalf("SSH result = %+v, want transport %q and %d timed calls", res, transport, sshTestRuns)
	}
	t.Logf("ssh \"true\" (%s): median %s over %d calls; %s", res.Transport, res.True.Median.Round(time.Microsecond), res.Runs, res.Path)
	// Nothing of the comparison is left in the guest: no process running
	// from its folder, no folder, no authorized key.
	script := `for p in /proc/[0-9]*; do case "$(readlink "$p/exe" 2>/dev/null)" in ` + guestSSHDir + `/*) echo "process ${p#/proc/}";; esac; done
[ -e ` + guestSSHDir + ` ] && echo "folder ` + guestSSHDir + `"
grep -l . /root/.ssh/authorized_keys 2>/dev/null
grep -qi ':08AE 00000000:0000 0A' /proc/net/tcp && echo "port 2222 still listening"
true`
	r, err := vm.Run(ctx, script)
	if err != nil {
		t.Fatalf("look for leftovers in the guest: %v", err)
	}
	if s := strings.TrimSpace(string(r.Stdout)); s != "" || r.ExitCode != 0 {
		t.Errorf("left in the guest after the SSH comparison (exit code %d):\n%s\n%s", r.ExitCode, s, r.Stderr)
	}
}

// TestSSHPortForward runs the SSH comparison once against a VM with the
// default network (user mode): dropbear listens on the guest's port 2222
// and dbclient connects to the host port the VM forwards to it. The forward
// must be closed afterwards.
func TestSSHPortForward(t *testing.T) {
	needSSHTools(t)
	vm := testutil.SharedVM(t)
	ctx := testutil.Context(t, 10*time.Minute)
	in, err := vm.Network(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if in.Mode != smolvm.NetworkUser {
		t.Fatalf("the shared VM's network is %q, want %q", in.Mode, smolvm.NetworkUser)
	}
	before, err := vm.Ports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res := measureSSH(ctx, vm, sshTestRuns, testLogger(t))
	checkSSHResult(t, ctx, vm, res, transportForward+", user-mode NIC")
	if !strings.Contains(res.Path, "host 127.0.0.1:") || !strings.Contains(res.Path, "guest eth0 :2222") {
		t.Errorf("path %q does not name the forwarded port", res.Path)
	}
	after, err := vm.Ports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Errorf("port forwards before %v, after %v: the SSH forward was not closed", before, after)
	}
}

// TestSSHExecBridge runs the SSH comparison once against a VM without a
// NIC: each connection is bridged into the guest with busybox nc over the
// agent's exec stream.
func TestSSHExecBridge(t *testing.T) {
	needSSHTools(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Network: smolvm.NetworkNone, BootTimeout: testutil.BootTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := vm.Close(); err != nil {
			t.Error(err)
		}
	}()
	res := measureSSH(ctx, vm, sshTestRuns, testLogger(t))
	checkSSHResult(t, ctx, vm, res, transportBridge)
}
