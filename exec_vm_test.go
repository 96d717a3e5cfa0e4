package smolvm_test

// Real-VM tests of running commands. They share one booted VM
// (testutil.SharedVM) and must leave it working: every file they make in
// the guest has a name of its own.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// testCtx bounds one test's calls; boots are bounded separately.
func testCtx(t *testing.T) context.Context {
	return testutil.Context(t, 5*time.Minute)
}

// uniq is a name no other test uses, for files in the shared guest.
func uniq(t *testing.T) string {
	return fmt.Sprintf("/tmp/%s-%d", strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()), time.Now().UnixNano())
}

const outErrExit3 = `sh -c 'echo out; echo err >&2; exit 3'`

func TestRunStdoutStderrExitCode(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)

	res, err := vm.Run(ctx, outErrExit3)
	if err != nil {
		t.Fatalf("Run: a non-zero exit is not an error, got %v", err)
	}
	if string(res.Stdout) != "out\n" || string(res.Stderr) != "err\n" || res.ExitCode != 3 {
		t.Errorf("Run = stdout %q, stderr %q, exit %d; want \"out\\n\", \"err\\n\", 3", res.Stdout, res.Stderr, res.ExitCode)
	}
	if res.TimedOut || res.Signal != 0 || res.Truncated {
		t.Errorf("Run: TimedOut %v, Signal %d, Truncated %v; want all zero", res.TimedOut, res.Signal, res.Truncated)
	}

	res, err = vm.Run(ctx, "echo hello")
	if err != nil || res.ExitCode != 0 || string(res.Stdout) != "hello\n" {
		t.Errorf("Run(echo hello) = %+v, %v", res, err)
	}
}

func TestCommandExitError(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	script := "echo out; echo err >&2; exit 3"

	t.Run("Run", func(t *testing.T) {
		var stdout, stderr bytes.Buffer
		c := vm.Command(ctx, "sh", "-c", script)
		c.Stdout, c.Stderr = &stdout, &stderr
		err := c.Run()
		var ee *smolvm.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("Run: want *smolvm.ExitError, got %T %v", err, err)
		}
		if ee.ExitCode != 3 || ee.TimedOut || ee.Signal != 0 {
			t.Errorf("ExitError = %+v; want exit code 3", ee.ProcessState)
		}
		if ee.Error() != "exit status 3" {
			t.Errorf("ExitError.Error() = %q, want \"exit status 3\"", ee.Error())
		}
		if c.ProcessState == nil || c.ProcessState.ExitCode != 3 || c.ProcessState.Success() {
			t.Errorf("ProcessState = %+v", c.ProcessState)
		}
		if stdout.String() != "out\n" || stderr.String() != "err\n" {
			t.Errorf("stdout %q, stderr %q", stdout.String(), stderr.String())
		}
	})

	t.Run("Output", func(t *testing.T) {
		out, err := vm.Command(ctx, "sh", "-c", script).Output()
		var ee *smolvm.ExitError
		if !errors.As(err, &ee) || ee.ExitCode != 3 {
			t.Fatalf("Output: want ExitError with code 3, got %v", err)
		}
		if string(out) != "out\n" {
			t.Errorf("Output stdout = %q, want \"out\\n\"", out)
		}
		if string(ee.Stderr) != "err\n" {
			t.Errorf("ExitError.Stderr = %q, want \"err\\n\"", ee.Stderr)
		}
		out, err = vm.Command(ctx, "echo", "a b", "c").Output()
		if err != nil || string(out) != "a b c\n" {
			t.Errorf("Output(echo 'a b' c) = %q, %v", out, err)
		}
	})

	t.Run("CombinedOutput", func(t *testing.T) {
		out, err := vm.Command(ctx, "sh", "-c", "echo out; sleep 0.1; echo err >&2; exit 3").CombinedOutput()
		var ee *smolvm.ExitError
		if !errors.As(err, &ee) || ee.ExitCode != 3 {
			t.Fatalf("CombinedOutput: want ExitError with code 3, got %v", err)
		}
		if string(out) != "out\nerr\n" {
			t.Errorf("CombinedOutput = %q, want \"out\\nerr\\n\"", out)
		}
	})

	t.Run("ShellCommand", func(t *testing.T) {
		out, err := vm.ShellCommand(ctx, "echo $((6*7)) | tr 4 x").Output()
		if err != nil || string(out) != "x2\n" {
			t.Errorf("ShellCommand output = %q, %v", out, err)
		}
	})

	t.Run("MissingProgram", func(t *testing.T) {
		// A program that cannot start is a *StartError with the exit
		// status a shell would give it, over the fast lane (no stdin)
		// and over gRPC (with stdin).
		for _, c := range []struct {
			argv  []string
			stdin bool
			code  int
		}{
			{[]string{"no-such-program-xyz"}, false, 127},
			{[]string{"no-such-program-xyz"}, true, 127},
			{[]string{"/etc/passwd"}, false, 126},
		} {
			cmd := vm.Command(ctx, c.argv[0], c.argv[1:]...)
			if c.stdin {
				cmd.Stdin = strings.NewReader("x")
			}
			err := cmd.Run()
			var se *smolvm.StartError
			if !errors.As(err, &se) || se.ExitCode != c.code || !strings.Contains(err.Error(), c.argv[0]) {
				t.Errorf("%v (stdin %v): %v; want a *StartError with exit code %d naming it", c.argv, c.stdin, err, c.code)
			}
		}
	})
}

func TestEnvAndDir(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)

	res, err := vm.Run(ctx, `echo "$FOO|$BAR"; pwd`,
		smolvm.WithEnv("FOO=foo bar", "BAR=x=y"), smolvm.WithDir("/tmp"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "foo bar|x=y\n/tmp\n"; string(res.Stdout) != want || res.ExitCode != 0 {
		t.Errorf("WithEnv/WithDir: got %q (exit %d, stderr %q), want %q", res.Stdout, res.ExitCode, res.Stderr, want)
	}

	c := vm.Command(ctx, "sh", "-c", `echo "$GREETING"; pwd; echo "$PATH" | grep -q /bin && echo path-ok`)
	c.Env = []string{"GREETING=hello world"}
	c.Dir = "/etc"
	out, err := c.Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello world\n/etc\npath-ok\n"; string(out) != want {
		t.Errorf("Cmd.Env/Cmd.Dir: got %q, want %q", out, want)
	}

	res, err = vm.Run(ctx, "pwd")
	if err != nil || strings.TrimSpace(string(res.Stdout)) != "/root" {
		t.Errorf("default working directory: got %q, %v; want /root", res.Stdout, err)
	}

	t.Run("MissingDir", func(t *testing.T) {
		const dir = "/no/such/dir"
		res, err := vm.Run(ctx, "pwd", smolvm.WithDir(dir))
		if err == nil {
			t.Fatalf("Run in a missing directory succeeded: %+v", res)
		}
		var ee *smolvm.ExitError
		if errors.As(err, &ee) {
			t.Errorf("missing directory is an ExitError (%v); want an error saying the command could not run", err)
		}
		if !strings.Contains(err.Error(), dir) {
			t.Errorf("error %q does not name the directory %s", err, dir)
		}
		c := vm.Command(ctx, "pwd")
		c.Dir = dir
		if err := c.Start(); err == nil {
			_ = c.Wait()
			t.Error("Cmd.Start in a missing directory succeeded")
		} else if !strings.Contains(err.Error(), dir) {
			t.Errorf("Cmd.Start error %q does not name the directory", err)
		}
	})
}

func TestTimeoutKillsChildren(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	pidfile := uniq(t)

	res, err := vm.Run(ctx, fmt.Sprintf("sleep 300 & echo $! > %s; sleep 300", pidfile), smolvm.WithTimeout(time.Second))
	if err != nil {
		t.Fatalf("Run with timeout: %v", err)
	}
	if !res.TimedOut || res.ExitCode == 0 {
		t.Errorf("Run: TimedOut %v, exit %d; want timed out with a non-zero exit", res.TimedOut, res.ExitCode)
	}
	res, err = vm.Run(ctx, "cat "+pidfile+"; rm -f "+pidfile)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("read child pid: %+v, %v", res, err)
	}
	child := strings.TrimSpace(string(res.Stdout))
	if child == "" {
		t.Fatal("the command wrote no child pid")
	}
	// The background child must be gone too (reaped: no /proc entry).
	var last string
	if err := testutil.Poll(30*time.Second, func() bool {
		r, err := vm.Run(ctx, fmt.Sprintf("if [ -e /proc/%s ]; then cat /proc/%s/stat; exit 1; fi", child, child))
		if err != nil {
			last = err.Error()
			return false
		}
		last = string(r.Stdout)
		return r.ExitCode == 0
	}); err != nil {
		t.Errorf("child %s of the timed-out command still exists: %s", child, last)
	}

	c := vm.Command(ctx, "sleep", "300")
	c.Timeout = time.Second
	err = c.Run()
	var ee *smolvm.ExitError
	if !errors.As(err, &ee) || !ee.TimedOut {
		t.Errorf("Cmd with Timeout: want ExitError with TimedOut, got %v", err)
	} else if !strings.Contains(ee.Error(), "timed out") {
		t.Errorf("ExitError.Error() = %q, want it to say timed out", ee.Error())
	}
}

func TestContextCancelKillsCommand(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	pidfile := uniq(t)

	cctx, cancel := context.WithCancel(ctx)
	c := vm.ShellCommand(cctx, fmt.Sprintf("echo $$ > %s; exec sleep 300", pidfile))
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	pid := guestPid(t, vm, pidfile)
	cancel()
	if err := c.Wait(); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait after cancel = %v, want context.Canceled", err)
	}
	waitGuestGone(t, vm, pid, pidfile)
}

// guestPid waits for a command in the guest to write its pid to pidfile.
func guestPid(t *testing.T, vm *smolvm.VM, pidfile string) string {
	t.Helper()
	var pid string
	if err := testutil.Poll(time.Minute, func() bool {
		r, err := vm.Run(testCtx(t), "cat "+pidfile)
		if err == nil && r.ExitCode == 0 {
			pid = strings.TrimSpace(string(r.Stdout))
		}
		return pid != ""
	}); err != nil {
		t.Fatal("the command did not start")
	}
	return pid
}

// waitGuestGone waits for a guest process to end after its command was
// cancelled, and removes its pidfile.
func waitGuestGone(t *testing.T, vm *smolvm.VM, pid, pidfile string) {
	t.Helper()
	ctx := testCtx(t)
	if err := testutil.Poll(30*time.Second, func() bool {
		r, err := vm.Run(ctx, fmt.Sprintf("[ ! -e /proc/%s ]", pid))
		return err == nil && r.ExitCode == 0
	}); err != nil {
		t.Errorf("guest process %s lives on after its context was cancelled", pid)
	}
	_, _ = vm.Run(ctx, "rm -f "+pidfile)
}

func TestBinaryBytes(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)

	res, err := vm.Run(ctx, `printf '\377\376\000\001'`)
	if err != nil {
		t.Fatal(err)
	}
	if want := []byte{0xff, 0xfe, 0x00, 0x01}; !bytes.Equal(res.Stdout, want) {
		t.Errorf("printf output = %x, want %x", res.Stdout, want)
	}

	// Every byte value, and invalid UTF-8 sequences, through stdin and back.
	in := []byte{0xff, 0xfe, 0x00, 0x01, 0xc3, 0x28, 0xe2, 0x82, '\n', 0x80, '\r'}
	for i := 0; i < 256; i++ {
		in = append(in, byte(i))
	}
	res, err = vm.Run(ctx, "cat", smolvm.WithStdin(bytes.NewReader(in)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res.Stdout, in) {
		t.Errorf("cat round trip:\n got %x\nwant %x", res.Stdout, in)
	}
	// What the guest received, as it sees it.
	res, err = vm.Run(ctx, "od -An -v -tx1 | tr -d ' \\n'", smolvm.WithStdin(bytes.NewReader(in)))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%x", in); string(res.Stdout) != want {
		t.Errorf("guest received:\n got %s\nwant %s", res.Stdout, want)
	}
	// Stderr is byte-exact too.
	res, err = vm.Run(ctx, `printf '\377\000\200' >&2`)
	if err != nil || !bytes.Equal(res.Stderr, []byte{0xff, 0x00, 0x80}) {
		t.Errorf("stderr bytes = %x, %v", res.Stderr, err)
	}

	// A large stdin (several messages) arrives whole.
	big := bytes.Repeat([]byte{0xff, 0x00, 0x7f, 0x80}, 256<<10)
	res2, err := vm.Run(ctx, "cat | wc -c", smolvm.WithStdin(bytes.NewReader(big)))
	if err != nil || strings.TrimSpace(string(res2.Stdout)) != fmt.Sprint(len(big)) {
		t.Errorf("large stdin: guest counted %q bytes, want %d (%v)", res2.Stdout, len(big), err)
	}
}

func TestConcurrentExecs(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	const n = 20
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			res, err := vm.Run(ctx, fmt.Sprintf("echo start-%d; sleep 0.5; echo end-%d >&2; exit %d", i, i, i%7),
				smolvm.WithEnv(fmt.Sprintf("N=%d", i)))
			if err != nil {
				t.Errorf("exec %d: %v", i, err)
				return
			}
			if got, want := string(res.Stdout), fmt.Sprintf("start-%d\n", i); got != want {
				t.Errorf("exec %d: stdout %q, want %q", i, got, want)
			}
			if got, want := string(res.Stderr), fmt.Sprintf("end-%d\n", i); got != want {
				t.Errorf("exec %d: stderr %q, want %q", i, got, want)
			}
			if res.ExitCode != i%7 {
				t.Errorf("exec %d: exit %d, want %d", i, res.ExitCode, i%7)
			}
		}(i)
	}
	wg.Wait()
}

func TestPingAndInfo(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	ai, err := vm.Ping(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ai.Hostname != vm.Name() || ai.Kernel == "" {
		t.Errorf("Ping = %+v; want hostname %q and a kernel", ai, vm.Name())
	}
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if in.ID != vm.ID() || in.State != "running" || in.Persistent || in.VCPUs != 1 || in.MemoryMiB != 512 {
		t.Errorf("Info = %+v", in)
	}
	list, err := testutil.OpenHost(t, testutil.SharedHome()).List(ctx)
	if err != nil || len(list) != 1 || list[0].ID != vm.ID() {
		t.Errorf("List of the shared home = %v, %v; want the shared VM alone", list, err)
	}
}

// TestRunOverTheFastLane covers what Run does over the agent's fast lane
// (a command without stdin): output over many frames, the output limit,
// and cancellation, which the lane carries as a call of its own.
func TestRunOverTheFastLane(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	if !smolvm.OnLane(ctx, vm) {
		t.Fatal("the shared VM's fast lane is down")
	}
	res, err := vm.Run(ctx, "head -c 1000000 /dev/zero | tr '\\0' x; echo done >&2")
	if err != nil || len(res.Stdout) != 1000000 || string(res.Stderr) != "done\n" || res.Truncated {
		t.Fatalf("1 MB of output: %d bytes, stderr %q, truncated %v, %v", len(res.Stdout), res.Stderr, res.Truncated, err)
	}
	if strings.Trim(string(res.Stdout), "x") != "" {
		t.Error("1 MB of output: bytes other than x")
	}
	res, err = vm.Run(ctx, "head -c 300000 /dev/zero; exit 4", smolvm.WithOutputLimit(1000))
	if err != nil || len(res.Stdout) != 1000 || !res.Truncated || res.ExitCode != 4 {
		t.Fatalf("limited output: %d bytes, truncated %v, exit %d, %v", len(res.Stdout), res.Truncated, res.ExitCode, err)
	}
	if _, err := vm.Run(ctx, "true", smolvm.WithDir("/nonexistent")); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("Run in a missing directory: %v", err)
	}

	pidfile := uniq(t)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := vm.Run(cctx, fmt.Sprintf("echo $$ > %s; exec sleep 300", pidfile))
		done <- err
	}()
	pid := guestPid(t, vm, pidfile)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run after cancel = %v, want context.Canceled", err)
	}
	waitGuestGone(t, vm, pid, pidfile)
}

// TestIdleGuestTimersOff: the guest runs without the timers that woke an
// idle VM (kcompactd's proactive compaction, the lockup watchdog, IPv6
// router solicitations, PSI's averaging), set on the kernel command line.
func TestIdleGuestTimersOff(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	out, err := vm.Command(testCtx(t), "cat", "/proc/sys/vm/compaction_proactiveness", "/proc/sys/kernel/watchdog",
		"/proc/sys/net/ipv6/conf/default/router_solicitations").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(string(out)); !slices.Equal(got, []string{"0", "0", "0"}) {
		t.Errorf("compaction_proactiveness, watchdog, router_solicitations = %v, want 0 0 0", got)
	}
	// PSI is off (psi=0): its averaging work woke an idle guest every 2 s.
	if out, err := vm.Command(testCtx(t), "ls", "/proc/pressure").CombinedOutput(); err == nil {
		t.Errorf("/proc/pressure exists (PSI is on): %s", out)
	}
}
