package smolvm_test

// Real-VM tests of an agent that survives its guest: what a command can
// do to PID 1 as guest root (signals, a fork bomb, a memory hog) leaves
// the agent serving the next command, and a guest kernel panic is
// recorded as one, with its reason.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// commandsCgroup is the cgroup the agent starts commands in (see
// internal/agent/cgroup.go).
const commandsCgroup = "/sys/fs/cgroup/smolvm-commands"

// nextCommand polls until a command runs in vm again (a fork bomb's
// leftovers may hold every process slot of the commands for a while) and
// returns its output; a VM that is gone fails the test at once.
func nextCommand(ctx context.Context, t *testing.T, vm *smolvm.VM, what, cmd string) string {
	t.Helper()
	var last error
	var out string
	if err := testutil.Poll(3*time.Minute, func() bool {
		res, err := vm.Run(ctx, cmd)
		if errors.Is(err, smolvm.ErrNotRunning) {
			t.Fatalf("after %s the VM is gone: %v", what, err)
		}
		if err == nil && res.ExitCode != 0 {
			err = errors.New(string(res.Stderr))
		}
		if last = err; err != nil {
			return false
		}
		out = string(res.Stdout)
		return true
	}); err != nil {
		t.Fatalf("after %s no command runs: %v", what, last)
	}
	return out
}

func TestAgentSurvivesItsGuest(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	ctx := testutil.Context(t, 20*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Network: "none"})
	boot := nextCommand(ctx, t, vm, "boot", "cat /proc/sys/kernel/random/boot_id")
	sameBoot := func(t *testing.T, what string) {
		t.Helper()
		if got := nextCommand(ctx, t, vm, what, "cat /proc/sys/kernel/random/boot_id"); got != boot {
			t.Fatalf("after %s the guest booted again (boot id %q, was %q)", what, got, boot)
		}
	}

	t.Run("Signals", func(t *testing.T) {
		// The kernel delivers to PID 1 only what it handles; the Go
		// runtime handles these by crashing, unless told otherwise.
		for _, sig := range []string{"SEGV", "ABRT", "BUS", "FPE", "ILL", "TRAP", "SYS", "TERM", "INT", "HUP", "QUIT", "USR1", "PIPE", "ALRM"} {
			res, err := vm.Run(ctx, "kill -"+sig+" 1")
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("kill -%s 1 = %+v, %v", sig, res, err)
			}
			sameBoot(t, "kill -"+sig+" 1")
		}
	})

	t.Run("QueuedSignals", func(t *testing.T) {
		// rt_sigqueueinfo sends with code SI_QUEUE, which the Go runtime
		// takes for a fault of its own in SEGV, BUS, FPE, ILL, TRAP and
		// SYS; the agent's guard drops it.
		bin := filepath.Join(t.TempDir(), "sigqueue")
		build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./testdata/sigqueue")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build sigqueue: %v\n%s", err, out)
		}
		if err := vm.Upload(ctx, bin, "/tmp/sigqueue"); err != nil {
			t.Fatalf("upload sigqueue: %v", err)
		}
		for _, sig := range []syscall.Signal{syscall.SIGSEGV, syscall.SIGBUS, syscall.SIGABRT, syscall.SIGFPE, syscall.SIGILL, syscall.SIGTRAP, syscall.SIGSYS} {
			cmd := fmt.Sprintf("chmod +x /tmp/sigqueue && /tmp/sigqueue 1 %d", int(sig))
			res, err := vm.Run(ctx, cmd)
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("sigqueue 1 %v = %+v, %v", sig, res, err)
			}
			sameBoot(t, "sigqueue 1 "+sig.String())
		}
	})

	t.Run("ForkBomb", func(t *testing.T) {
		// The bomb forks until the commands' process limit stops it. The
		// shell waits, without forking (a read of a FIFO nobody writes
		// times out each second), for the limit to have been met, then
		// kills its process group, the bomb with it.
		// The limit is that of the command's own cgroup.
		bomb := `fifo=$(mktemp -u); mkfifo $fifo; exec 3<>$fifo; rm $fifo
cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
f(){ f|f& }; f
while :; do read -r _ n < $cg/pids.events; [ "$n" -gt 0 ] 2>/dev/null && kill -9 0; read -t 1 -u 3 _; done`
		res, err := vm.Run(ctx, bomb, smolvm.WithTimeout(10*time.Minute), smolvm.WithOutputLimit(1<<20))
		if err != nil {
			t.Fatalf("fork bomb: %v", err)
		}
		if res.Signal != 9 || res.TimedOut {
			t.Errorf("fork bomb: exit %d, signal %d, timed out %v; want it to meet the process limit (stderr %.300q)", res.ExitCode, res.Signal, res.TimedOut, res.Stderr)
		}
		t.Logf("the fork bomb met the limit after %v", res.Duration)
		sameBoot(t, "a fork bomb")
	})

	t.Run("MemoryHog", func(t *testing.T) {
		// One buffer of nine tenths of the guest's memory.
		hog := `dd if=/dev/zero of=/dev/null count=1 bs=$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) * 9 / 10 ))k`
		res, err := vm.Run(ctx, hog, smolvm.WithTimeout(5*time.Minute))
		if err != nil {
			t.Fatalf("memory hog: %v", err)
		}
		if res.Signal != 9 {
			t.Errorf("memory hog = exit %d, signal %d (stderr %q); want killed by the OOM killer", res.ExitCode, res.Signal, res.Stderr)
		}
		sameBoot(t, "a memory hog")
		ev := nextCommand(ctx, t, vm, "a memory hog", "cat "+commandsCgroup+"/memory.events")
		if !strings.Contains(ev, "oom_kill ") || strings.Contains(ev, "oom_kill 0") {
			t.Errorf("the commands' cgroup saw no OOM kill:\n%s", ev)
		}
	})
}

// TestForkBombInBackground: a fork bomb that outlives its command (its own
// session, no timeout) forks until its own cgroup's limit and goes on
// running; the next command still starts, and forks.
func TestForkBombInBackground(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 15*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Network: "none"})
	bomb := `setsid sh -c 'f(){ f|f& }; f' </dev/null >/dev/null 2>&1 &`
	if res, err := vm.Run(ctx, bomb); err != nil || res.ExitCode != 0 {
		t.Fatalf("background fork bomb: %+v, %v", res, err)
	}
	// Wait for it to meet a limit: its own cgroup's, or (without cgroups
	// per command) the commands' one.
	nextCommand(ctx, t, vm, "a background fork bomb", `for f in `+commandsCgroup+`/pids.events `+commandsCgroup+`/*/pids.events; do
  [ -f "$f" ] && [ "$(sed -n 's/^max //p' "$f")" -gt 0 ] && exit 0
done; exit 1`)
	res, err := vm.Run(ctx, `for i in $(seq 50); do sleep 0.01 & done; wait; echo forked`, smolvm.WithTimeout(5*time.Minute))
	if err != nil {
		t.Fatalf("a command next to a background fork bomb: %v", err)
	}
	if res.ExitCode != 0 || strings.TrimSpace(string(res.Stdout)) != "forked" {
		t.Fatalf("a command next to a background fork bomb: exit %d, stdout %q, stderr %q; want it to start and fork 50 processes", res.ExitCode, res.Stdout, res.Stderr)
	}
	t.Logf("a command that forks 50 processes next to the bomb: %v", res.Duration)
}

// TestGuestKernelPanic: a guest whose kernel panics is failed, with the
// panic's reason from the console, in the list and in Info.
func TestGuestKernelPanic(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Persistent: true, Network: "none"})
	const want = "guest kernel panic: sysrq triggered crash"
	// The guest dies with the command, whose call names why.
	if _, err := vm.Run(ctx, "echo c > /proc/sysrq-trigger"); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Run of the command that panics the guest = %v; want an error naming the panic", err)
	}
	var got *smolvm.Info
	if err := testutil.Poll(2*time.Minute, func() bool {
		list, err := testutil.OpenHost(t, home).List(ctx)
		if err != nil || len(list) != 1 {
			t.Fatalf("ListIn = %v, %v; want the one VM", list, err)
		}
		got = list[0]
		// Under load a busy supervisor can miss the list's 2 s probe
		// and show as unresponsive for a while: wait through that.
		return got.State != "running" && got.State != "unresponsive"
	}); err != nil {
		t.Fatalf("the VM is still %s (%s) two minutes after the panic", got.State, got.Reason)
	}
	if got.State != "failed" || got.Reason != want {
		t.Errorf("List shows the VM %s (%s); want failed (%s)", got.State, got.Reason, want)
	}
	if in, err := vm.Info(ctx); err != nil || in.State != "failed" || in.Reason != want {
		t.Errorf("Info = %+v, %v; want failed (%s)", in, err, want)
	}
	if _, err := vm.Run(ctx, "true"); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Run on the VM = %v; want an error naming the panic", err)
	}
}
