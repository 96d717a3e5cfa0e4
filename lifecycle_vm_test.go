package smolvm_test

// Real-VM tests of a VM's life: persistent VMs reached from other
// processes, stop and start, crashes of the hypervisor or the supervisor,
// bad input, phase timings, guests that do not boot. Each test that boots
// has a state folder of its own (testutil.Home).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/supervisor"
	"github.com/smolvm/smolvm/internal/testutil"
)

// newVM boots a VM for one test; it is closed when the test ends (and the
// test's home removes whatever is left).
func newVM(t *testing.T, cfg smolvm.Config) *smolvm.VM {
	t.Helper()
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = testutil.BootTimeout
	}
	if cfg.Persistent && cfg.SupervisorBinary == "" {
		cfg.SupervisorBinary = testutil.Binary(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.BootTimeout+time.Minute)
	defer cancel()
	vm, err := smolvm.New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := vm.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return vm
}

// stateOf is what a home holds: VM rows and state folders.
type homeState struct {
	rows    []string
	folders []string
}

func stateOf(t *testing.T, home string) homeState {
	t.Helper()
	var s homeState
	list, err := testutil.OpenHost(t, home).List(context.Background())
	if err != nil {
		t.Fatalf("List(%s): %v", home, err)
	}
	for _, in := range list {
		s.rows = append(s.rows, in.ID+"/"+in.Name+"/"+string(in.State))
	}
	ents, err := os.ReadDir(filepath.Join(home, "vms"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range ents {
		s.folders = append(s.folders, e.Name())
	}
	return s
}

func (s homeState) equal(o homeState) bool {
	return slices.Equal(s.rows, o.rows) && slices.Equal(s.folders, o.folders)
}

// assertNothingLeft checks that home has no VM row, no VM folder and no
// process (QEMU or supervisor), polling for processes that are exiting.
func assertNothingLeft(t *testing.T, home string) {
	t.Helper()
	if left := testutil.WaitNoProcesses(home, 30*time.Second); len(left) > 0 {
		t.Errorf("processes left: %s", strings.Join(left, "; "))
	}
	if s := stateOf(t, home); len(s.rows) > 0 || len(s.folders) > 0 {
		t.Errorf("state left in %s: rows %v, folders %v", home, s.rows, s.folders)
	}
}

func TestPersistentVM(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	bin := testutil.Binary(t)
	ctx := testutil.Context(t, 15*time.Minute)
	// A caller logging at debug level gets its supervisor's debug log too
	// (supervisor.log): CommandThroughTheSupervisor reads it.
	debug := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug}))
	vm := newVM(t, smolvm.Config{Home: home, Name: "persist", Persistent: true, Logger: debug})

	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !in.Persistent || in.State != "running" || in.SupervisorPID == os.Getpid() ||
		!testutil.PidAlive(in.SupervisorPID) || !testutil.PidAlive(in.HypervisorPID) {
		t.Fatalf("Info = %+v; want a running persistent VM with its own live supervisor and hypervisor", in)
	}
	if res, err := vm.Run(ctx, "echo via-supervisor"); err != nil || string(res.Stdout) != "via-supervisor\n" {
		t.Fatalf("Run through the supervisor = %+v, %v", res, err)
	}

	t.Run("TwoProcessesExecAtOnce", func(t *testing.T) {
		// Each command waits until the other one has started, so they
		// overlap in the guest for sure.
		script := func(me, other string, code int) string {
			return fmt.Sprintf(`touch /tmp/meet-%s; i=0; while [ ! -e /tmp/meet-%s ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 99; sleep 0.05; done; echo marker-%s; exit %d`,
				me, other, me, code)
		}
		type result struct {
			out, errOut bytes.Buffer
			err         error
		}
		runs := []struct {
			me, other string
			code      int
		}{{"a", "b", 21}, {"b", "a", 22}}
		results := make([]result, len(runs))
		var wg sync.WaitGroup
		for i, r := range runs {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				cmd := exec.CommandContext(ctx, bin, "exec", vm.ID(), "--", "sh", "-c", script(r.me, r.other, r.code))
				cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
				cmd.Stdout, cmd.Stderr = &results[i].out, &results[i].errOut
				results[i].err = cmd.Run()
			}(i)
		}
		wg.Wait()
		for i, r := range runs {
			res := &results[i]
			var ee *exec.ExitError
			if !errors.As(res.err, &ee) || ee.ExitCode() != r.code {
				t.Errorf("process %s: %v (stderr %q); want exit code %d", r.me, res.err, res.errOut.String(), r.code)
			}
			if want := "marker-" + r.me + "\n"; res.out.String() != want {
				t.Errorf("process %s: stdout %q, want %q", r.me, res.out.String(), want)
			}
		}
	})

	t.Run("CommandThroughTheSupervisor", func(t *testing.T) {
		// A command without stdin through api.sock runs over the agent's
		// fast lane (execOverLane): it must behave as over gRPC. Output
		// streams while the command runs, stderr stays apart, a signal
		// reaches it, and a missing program is an error of Start.
		var out lineRecorder
		var errOut bytes.Buffer
		c := vm.ShellCommand(ctx, "echo first; echo warn >&2; while [ ! -e /tmp/go-on ]; do sleep 0.05; done; echo second; sleep 60")
		c.Stdout, c.Stderr = &out, &errOut
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		if c.Process.Pid <= 0 {
			t.Errorf("pid %d", c.Process.Pid)
		}
		if err := testutil.Poll(time.Minute, func() bool { return len(out.lines()) == 1 }); err != nil {
			t.Fatalf("first line not streamed: %q", out.lines())
		}
		if _, err := vm.Run(ctx, "touch /tmp/go-on"); err != nil {
			t.Fatal(err)
		}
		if err := testutil.Poll(time.Minute, func() bool { return len(out.lines()) == 2 }); err != nil {
			t.Fatalf("second line not streamed: %q", out.lines())
		}
		if err := c.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		var ee *smolvm.ExitError
		if err := c.Wait(); !errors.As(err, &ee) || ee.Signal != syscall.SIGTERM {
			t.Fatalf("Wait after SIGTERM = %v", err)
		}
		if got := strings.Join(out.lines(), ","); got != "first,second" || errOut.String() != "warn\n" {
			t.Errorf("stdout %q, stderr %q", got, errOut.String())
		}
		if log, err := os.ReadFile(filepath.Join(in.Dir, supervisor.LogFile)); err != nil || !bytes.Contains(log, []byte("exec over the fast lane")) {
			t.Errorf("the supervisor did not run the command over the fast lane (%v); its log:\n%s", err, log)
		}
		if err := vm.Command(ctx, "no-such-program").Start(); err == nil || !strings.Contains(err.Error(), "not found") {
			t.Errorf("Start of a missing program = %v", err)
		}
		if out, err := vm.Command(ctx, "sh", "-c", "exit 7").Output(); !errors.As(err, &ee) || ee.ExitCode != 7 || len(out) != 0 {
			t.Errorf("exit 7: %q, %v", out, err)
		}
	})

	t.Run("OpenAndClose", func(t *testing.T) {
		h, err := testutil.OpenHost(t, home).Open(ctx, "persist")
		if err != nil {
			t.Fatal(err)
		}
		if res, err := h.Run(ctx, "hostname"); err != nil || strings.TrimSpace(string(res.Stdout)) != "persist" {
			t.Errorf("Run through a second handle = %+v, %v", res, err)
		}
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
		// Closing a handle of a persistent VM leaves it running.
		if res, err := vm.Run(ctx, "true"); err != nil || res.ExitCode != 0 {
			t.Errorf("Run after another handle was closed = %+v, %v", res, err)
		}
		if _, err := h.Run(ctx, "true"); err == nil {
			t.Error("Run on a closed handle succeeded")
		}
	})

	t.Run("StopStart", func(t *testing.T) {
		if err := vm.Stop(ctx); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		in, err := vm.Info(ctx)
		if err != nil || in.State != "stopped" {
			t.Fatalf("Info after Stop = %+v, %v; want stopped", in, err)
		}
		if left := testutil.WaitNoProcesses(home, 30*time.Second); len(left) > 0 {
			t.Errorf("processes left after Stop: %v", left)
		}
		if _, err := os.Stat(vm.Dir()); err != nil {
			t.Errorf("a stopped VM keeps its state folder: %v", err)
		}
		_, err = vm.Run(ctx, "true")
		if !errors.Is(err, smolvm.ErrNotRunning) || !strings.Contains(err.Error(), "smolvm start") {
			t.Errorf("Run on a stopped VM = %v; want ErrNotRunning saying 'smolvm start'", err)
		}
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start: %v", err)
		}
		res, err := vm.Run(ctx, "echo again; hostname")
		if err != nil || string(res.Stdout) != "again\npersist\n" {
			t.Fatalf("Run after Start = %+v, %v", res, err)
		}
		in, err = vm.Info(ctx)
		if err != nil || in.State != "running" || !testutil.PidAlive(in.SupervisorPID) || !testutil.PidAlive(in.HypervisorPID) {
			t.Errorf("Info after Start = %+v, %v", in, err)
		}
		// A second exec from another process works on the restarted VM.
		out, err := exec.CommandContext(ctx, bin, "--home", home, "exec", "persist", "--", "echo", "cli").CombinedOutput()
		if err != nil || string(out) != "cli\n" {
			t.Errorf("smolvm exec after Start: %q, %v", out, err)
		}
	})

	t.Run("Delete", func(t *testing.T) {
		dir := vm.Dir()
		if err := vm.Delete(ctx); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state folder %s after Delete: %v", dir, err)
		}
		assertNothingLeft(t, home)
		if vm.Timings().StopDelete <= 0 {
			t.Errorf("Timings().StopDelete = %v after Delete", vm.Timings().StopDelete)
		}
	})
}

func TestCrash(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		kill   func(in *smolvm.Info) int
		reason string
	}{
		{"KillHypervisor", func(in *smolvm.Info) int { return in.HypervisorPID }, "hypervisor"},
		{"KillSupervisor", func(in *smolvm.Info) int { return in.SupervisorPID }, "supervisor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			home := testutil.Home(t)
			ctx := testutil.Context(t, 10*time.Minute)
			vm := newVM(t, smolvm.Config{Home: home, Persistent: true})
			in, err := vm.Info(ctx)
			if err != nil {
				t.Fatal(err)
			}
			sup, hv := in.SupervisorPID, in.HypervisorPID
			if !testutil.PidAlive(sup) || !testutil.PidAlive(hv) || sup == os.Getpid() {
				t.Fatalf("Info = %+v: want a live supervisor and hypervisor of their own", in)
			}
			if err := syscall.Kill(tc.kill(in), syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			// Both processes end: the supervisor after recording the
			// failure, or QEMU through its parent-death signal.
			if err := testutil.Poll(time.Minute, func() bool { return !testutil.PidAlive(sup) && !testutil.PidAlive(hv) }); err != nil {
				t.Errorf("after kill -9 of %d: supervisor alive %v, hypervisor alive %v",
					tc.kill(in), testutil.PidAlive(sup), testutil.PidAlive(hv))
			}
			var got *smolvm.Info
			if err := testutil.Poll(time.Minute, func() bool {
				list, err := testutil.OpenHost(t, home).List(ctx)
				if err != nil || len(list) != 1 {
					t.Fatalf("ListIn = %v, %v; want the one VM", list, err)
				}
				got = list[0]
				return got.State == "failed"
			}); err != nil {
				t.Fatalf("List shows the VM %s (%s); want failed", got.State, got.Reason)
			}
			if !strings.Contains(got.Reason, tc.reason) {
				t.Errorf("failure reason %q does not mention the %s", got.Reason, tc.reason)
			}
			_, err = vm.Run(ctx, "true")
			if !errors.Is(err, smolvm.ErrNotRunning) && !(err != nil && strings.Contains(err.Error(), "failed")) {
				t.Errorf("Run on the failed VM = %v; want an error saying it failed", err)
			}
			removed, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home})
			if err != nil {
				t.Fatalf("Cleanup: %v", err)
			}
			if !slices.Contains(removed, vm.ID()) {
				t.Errorf("Cleanup removed %v, want %s", removed, vm.ID())
			}
			if _, err := os.Stat(filepath.Join(vm.Dir(), "api.sock")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("API socket after Cleanup: %v", err)
			}
			assertNothingLeft(t, home)
			if testutil.PidAlive(sup) || testutil.PidAlive(hv) {
				t.Errorf("after Cleanup: supervisor alive %v, hypervisor alive %v", testutil.PidAlive(sup), testutil.PidAlive(hv))
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	shared := testutil.SharedVM(t)
	ctx := testCtx(t)
	for _, tc := range []struct {
		name string
		home string
		run  func() error
		is   error
		msg  []string
	}{
		{"UnknownVM", home, func() error {
			vm, err := testutil.OpenHost(t, home).Open(ctx, "no-such-vm")
			if err == nil {
				vm.Close()
			}
			return err
		}, smolvm.ErrNotFound, []string{"no-such-vm", "not found"}},
		{"MissingKernel", home, func() error { return tryNew(ctx, smolvm.Config{Home: home, KernelPath: "/nonexistent"}) },
			smolvm.ErrInvalid, []string{"kernel", "/nonexistent"}},
		{"MemoryTooSmall", home, func() error { return tryNew(ctx, smolvm.Config{Home: home, MemoryMiB: 32}) },
			smolvm.ErrInvalid, []string{"memory", "64"}},
		{"NegativeVCPUs", home, func() error { return tryNew(ctx, smolvm.Config{Home: home, VCPUs: -1}) },
			smolvm.ErrInvalid, []string{"vcpus", "-1"}},
		{"InvalidName", home, func() error { return tryNew(ctx, smolvm.Config{Home: home, Name: "no spaces/here"}) },
			smolvm.ErrInvalid, []string{"name", "no spaces/here"}},
		{"UnknownHypervisor", home, func() error { return tryNew(ctx, smolvm.Config{Home: home, Hypervisor: "vmware"}) },
			smolvm.ErrInvalid, []string{"hypervisor", `"vmware"`, "qemu"}},
		{"NameTaken", testutil.SharedHome(), func() error {
			return tryNew(ctx, smolvm.Config{Home: testutil.SharedHome(), Name: shared.Name()})
		}, smolvm.ErrExists, []string{shared.Name()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := stateOf(t, tc.home)
			err := tc.run()
			if !errors.Is(err, tc.is) {
				t.Fatalf("error %v; want errors.Is %v", err, tc.is)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if after := stateOf(t, tc.home); !after.equal(before) {
				t.Errorf("a refused call changed the state folder: before %+v, after %+v", before, after)
			}
			if left := testutil.Processes(home); len(left) > 0 {
				t.Errorf("a refused call left processes: %v", left)
			}
		})
	}
}

// tryNew calls New and closes a VM it should not have made.
func tryNew(ctx context.Context, cfg smolvm.Config) error {
	cfg.BootTimeout = testutil.BootTimeout
	vm, err := smolvm.New(ctx, cfg)
	if err == nil {
		vm.Close()
	}
	return err
}

func TestTimingsStopDelete(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	ctx := testCtx(t)
	vm := newVM(t, smolvm.Config{Home: home})

	tm := vm.Timings()
	if tm.Create <= 0 || tm.Launch <= 0 || tm.FirstCommand <= 0 {
		t.Errorf("Timings after New = %+v; want create, launch and first command > 0", tm)
	}
	const slack = 20 * time.Millisecond
	if sum := tm.Create + tm.Launch + tm.FirstCommand; tm.CreateToFirstCommand < sum-slack {
		t.Errorf("CreateToFirstCommand %v < create+launch+first command %v", tm.CreateToFirstCommand, sum)
	}
	in, err := vm.Info(ctx)
	if err != nil || in.Timings.CreateToFirstCommand != tm.CreateToFirstCommand {
		t.Errorf("Info().Timings = %+v (%v); want %+v", in.Timings, err, tm)
	}
	t.Logf("phases: create %v, launch %v, first command %v, total %v", tm.Create, tm.Launch, tm.FirstCommand, tm.CreateToFirstCommand)

	// A stopped VM refuses commands with a hint.
	if err := vm.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if in, err := vm.Info(ctx); err != nil || in.State != "stopped" {
		t.Errorf("Info after Stop = %+v, %v", in, err)
	}
	_, err = vm.Run(ctx, "true")
	if !errors.Is(err, smolvm.ErrNotRunning) || !strings.Contains(err.Error(), "smolvm start") {
		t.Errorf("Run on a stopped VM = %v; want ErrNotRunning saying 'smolvm start'", err)
	}
	if _, err := vm.Ping(ctx); !errors.Is(err, smolvm.ErrNotRunning) {
		t.Errorf("Ping on a stopped VM = %v; want ErrNotRunning", err)
	}

	if err := vm.Delete(ctx); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if d := vm.Timings().StopDelete; d <= 0 {
		t.Errorf("Timings().StopDelete = %v after Delete", d)
	}
	assertNothingLeft(t, home)
}

func TestBootFailure(t *testing.T) {
	t.Parallel()
	// Random bytes (the same ones every run) stand in for a kernel or an
	// initramfs; the other half is the default image's.
	junk := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(junk)
	for _, tc := range []struct {
		name string
		junk string // "kernel" or "initrd"
		want []string
	}{
		// QEMU refuses to load it.
		{"JunkKernel", "kernel", []string{"qemu"}},
		// The kernel boots, finds no init and panics (or hangs until the
		// boot timeout): either way the console tail is in the error.
		{"JunkInitrd", "initrd", []string{"console", "panic"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			home := testutil.Home(t)
			ctx := testutil.Context(t, 5*time.Minute)
			img, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home, CachedOnly: true, NoWarm: true})
			if err != nil {
				t.Fatal(err)
			}
			bad := filepath.Join(t.TempDir(), "not-a-"+tc.junk)
			if err := os.WriteFile(bad, junk, 0o644); err != nil {
				t.Fatal(err)
			}
			const bootTimeout = 60 * time.Second
			cfg := smolvm.Config{Home: home, KernelPath: img.Kernel, InitrdPath: img.Initrd, BootTimeout: bootTimeout}
			if tc.junk == "kernel" {
				cfg.KernelPath = bad
			} else {
				cfg.InitrdPath = bad
			}
			t0 := time.Now()
			vm, err := smolvm.New(ctx, cfg)
			took := time.Since(t0)
			if err == nil {
				vm.Close()
				t.Fatalf("New booted with a %s of random bytes", tc.junk)
			}
			t.Logf("New failed after %v: %v", took, err)
			for _, w := range tc.want {
				if !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(w)) {
					t.Errorf("error does not include %q (the console or QEMU output): %v", w, err)
				}
			}
			if strings.Contains(err.Error(), "%!") {
				t.Errorf("error has a formatting mistake: %v", err)
			}
			// Correctness, not speed: the boot timeout bounds the wait.
			if took > 2*bootTimeout+30*time.Second {
				t.Errorf("New took %v to fail with a boot timeout of %v", took, bootTimeout)
			}
			assertNothingLeft(t, home)
		})
	}
}

// TestRunWhenHypervisorDies: a command running over the fast lane of an
// in-process VM whose QEMU is killed ends with an error that says the VM
// failed and why, and the next calls say so too.
func TestRunWhenHypervisorDies(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	ctx := testutil.Context(t, 5*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Network: "none"})
	if !smolvm.OnLane(ctx, vm) {
		t.Fatal("fast lane down")
	}
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := vm.Run(ctx, "touch /tmp/started; sleep 300")
		done <- err
	}()
	if err := testutil.Poll(time.Minute, func() bool {
		r, err := vm.Run(ctx, "test -e /tmp/started")
		return err == nil && r.ExitCode == 0
	}); err != nil {
		t.Fatal("the command did not start")
	}
	if err := syscall.Kill(in.HypervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for what, err := range map[string]error{"the running command": <-done, "a new command": runErr(ctx, vm)} {
		if !errors.Is(err, smolvm.ErrNotRunning) || !strings.Contains(err.Error(), "hypervisor exited") {
			t.Errorf("%s after QEMU was killed: %v; want ErrNotRunning naming the hypervisor's exit", what, err)
		}
	}
	if _, err := vm.Ping(ctx); !errors.Is(err, smolvm.ErrNotRunning) {
		t.Errorf("Ping after QEMU was killed: %v", err)
	}
}

func runErr(ctx context.Context, vm *smolvm.VM) error {
	_, err := vm.Run(ctx, "true")
	return err
}

// TestPausedVM: a paused VM, in this process or behind a supervisor,
// refuses new calls into the guest at once with what to do; a command's
// timeout holds while it is paused; the supervisor's errors keep their
// kind through api.sock.
func TestPausedVM(t *testing.T) {
	for _, persistent := range []bool{false, true} {
		t.Run(map[bool]string{false: "InProcess", true: "Persistent"}[persistent], func(t *testing.T) {
			t.Parallel()
			home := testutil.Home(t)
			vm := newVM(t, smolvm.Config{Home: home, Name: "frozen", Persistent: persistent})
			ctx := testutil.Context(t, 3*time.Minute)

			// A command started before the pause: its timeout ends it
			// on the host although the frozen guest cannot.
			// It has started when its first output arrives (Start may
			// return before the supervisor has the command).
			c := vm.Command(ctx, "sh", "-c", "echo started; exec sleep 600")
			c.Timeout = 3 * time.Second
			started := make(chan struct{})
			c.Stdout = &firstWrite{ch: started}
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			select {
			case <-started:
			case <-time.After(time.Minute):
				t.Fatal("the command did not start")
			}
			if err := vm.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- c.Wait() }()
			select {
			case err := <-done:
				var ee *smolvm.ExitError
				if !errors.As(err, &ee) || !ee.TimedOut {
					t.Errorf("Wait of a command with a timeout in a paused VM = %v; want an *ExitError that timed out", err)
				}
			case <-time.After(time.Minute):
				t.Fatal("a command's timeout did not hold while its VM was paused")
			}

			if in, err := vm.Info(ctx); err != nil || in.State != "paused" {
				t.Errorf("Info = %+v, %v; want paused", in, err)
			}
			res, err := vm.Run(ctx, "true", smolvm.WithTimeout(3*time.Second))
			if !errors.Is(err, smolvm.ErrNotRunning) || !strings.Contains(err.Error(), "smolvm resume frozen") {
				t.Errorf("Run in a paused VM = %+v, %v; want ErrNotRunning naming 'smolvm resume frozen'", res, err)
			}
			if _, err := vm.ReadFile(ctx, "/etc/hostname"); !errors.Is(err, smolvm.ErrNotRunning) {
				t.Errorf("ReadFile in a paused VM: %v; want ErrNotRunning", err)
			}
			if _, err := vm.Snapshot(ctx, "snap"); !errors.Is(err, smolvm.ErrNotRunning) {
				t.Errorf("Snapshot of a paused VM: %v; want ErrNotRunning", err)
			}

			// The supervisor's own errors keep their kind (a taken host port).
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			port := ln.Addr().(*net.TCPAddr).Port
			if _, err := vm.ExposePort(ctx, fmt.Sprintf("%d:80", port)); !errors.Is(err, smolvm.ErrInUse) || !strings.Contains(err.Error(), "already in use") {
				t.Errorf("ExposePort of a taken host port: %v; want ErrInUse", err)
			}
			if err := vm.ClosePort(ctx, port); !errors.Is(err, smolvm.ErrNotFound) {
				t.Errorf("ClosePort of a port not forwarded: %v; want ErrNotFound", err)
			}

			if err := vm.Resume(ctx); err != nil {
				t.Fatal(err)
			}
			if res, err := vm.Run(ctx, "echo back"); err != nil || string(res.Stdout) != "back\n" {
				t.Errorf("Run after Resume = %+v, %v", res, err)
			}
		})
	}
}

// firstWrite closes ch at its first write.
type firstWrite struct {
	once sync.Once
	ch   chan struct{}
}

func (w *firstWrite) Write(p []byte) (int, error) {
	w.once.Do(func() { close(w.ch) })
	return len(p), nil
}
