package main

// Tests of the built smolvm binary, run as a user would, each with a state
// folder of its own. The ones that boot guests need QEMU.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
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

func TestMain(m *testing.M) { testutil.Main(m) }

type cliResult struct {
	stdout, stderr string
	code           int
}

// smolvmRun runs the CLI with SMOLVM_HOME=home and stdin, and returns its
// output and exit code.
func smolvmRun(t *testing.T, home, stdin string, args ...string) cliResult {
	t.Helper()
	return smolvmRunWithin(t, testutil.BootTimeout+2*time.Minute, home, stdin, args...)
}

// smolvmRunWithin is smolvmRun for a command that must end within limit:
// the test fails (rather than waits) when it hangs.
func smolvmRunWithin(t *testing.T, limit time.Duration, home, stdin string, args ...string) cliResult {
	t.Helper()
	bin := testutil.Binary(t) // the first call builds it: not on the command's clock
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("smolvm %s hung: no end within %s (stderr %q)", strings.Join(args, " "), limit, trim(errOut.String()))
	}
	r := cliResult{stdout: out.String(), stderr: errOut.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("smolvm %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("smolvm %s → exit %d, stdout %q, stderr %q", strings.Join(args, " "), r.code, trim(r.stdout), trim(r.stderr))
	return r
}

func trim(s string) string {
	if len(s) > 400 {
		return s[:400] + "…"
	}
	return s
}

// mustOK runs the CLI and fails the test unless it exits 0.
func mustOK(t *testing.T, home, stdin string, args ...string) cliResult {
	t.Helper()
	r := smolvmRun(t, home, stdin, args...)
	if r.code != 0 {
		t.Fatalf("smolvm %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

type vmJSON struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	State   string `json:"state"`
	Reason  string `json:"reason"`
	Timings struct {
		Create               int64 `json:"create"`
		Launch               int64 `json:"launch"`
		FirstCommand         int64 `json:"first_command"`
		CreateToFirstCommand int64 `json:"create_to_first_command"`
	} `json:"timings"`
}

func listVMs(t *testing.T, home string) []vmJSON {
	t.Helper()
	r := mustOK(t, home, "", "ls", "--json")
	var vms []vmJSON
	if err := json.Unmarshal([]byte(r.stdout), &vms); err != nil {
		t.Fatalf("ls --json is not a JSON list of VMs: %v\n%s", err, r.stdout)
	}
	return vms
}

func TestCLIVersion(t *testing.T) {
	t.Parallel()
	r := mustOK(t, t.TempDir(), "", "version")
	if !strings.HasPrefix(r.stdout, "smolvm ") {
		t.Errorf("version printed %q, want it to start with \"smolvm \"", r.stdout)
	}
	if f := mustOK(t, t.TempDir(), "", "--version"); f.stdout != r.stdout {
		t.Errorf("--version printed %q, version %q", f.stdout, r.stdout)
	}
}

func TestCLIDoctor(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	r := smolvmRun(t, home, "", "doctor", "--json")
	var rep struct {
		OK     bool `json:"ok"`
		Checks []struct {
			Name   string `json:"name"`
			OK     bool   `json:"ok"`
			Detail string `json:"detail"`
		} `json:"checks"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("doctor --json is not JSON: %v\n%s", err, r.stdout)
	}
	if len(rep.Checks) == 0 {
		t.Error("doctor --json lists no checks")
	}
	if rep.OK != (r.code == 0) {
		t.Errorf("doctor: ok %v but exit code %d", rep.OK, r.code)
	}
	for _, c := range rep.Checks {
		if !c.OK {
			t.Errorf("doctor check %s failed on a host set up for tests: %s", c.Name, c.Detail)
		}
	}
}

func TestCLIBadInput(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)

	r := smolvmRun(t, home, "", "exec", "no-such-vm", "--", "true")
	if r.code != 2 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("exec on an unknown VM: exit %d, stderr %q; want exit 2 and \"not found\"", r.code, r.stderr)
	}

	for _, args := range [][]string{{"create", "--memory", "0"}, {"run", "--memory", "0", "--", "true"}} {
		r = smolvmRun(t, home, "", args...)
		if r.code == 0 || !strings.Contains(r.stderr, "--memory") {
			t.Errorf("smolvm %s: exit %d, stderr %q; want a failure naming --memory", strings.Join(args, " "), r.code, r.stderr)
		}
		if r.stdout != "" {
			t.Errorf("smolvm %s printed %q on stdout", strings.Join(args, " "), r.stdout)
		}
	}
	// Network settings that would open the host's loopback, or do
	// nothing, and capacity limits that are no limit, are refused as
	// invalid (exit 3), naming the fix.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"create", "--egress", "allowlist", "--allow-cidr", "127.0.0.1/32"}, "--add-host NAME:127.0.0.1"},
		{[]string{"create", "--add-host", "svc:127.0.0.1", "--egress", "off"}, "--egress off"},
		{[]string{"create", "--allow-domain", "example.com", "--add-host", "svc:127.0.0.1"}, "--allow-domain svc"},
		{[]string{"create", "--max-vms", "-2"}, "--max-vms -2"},
		{[]string{"run", "--max-memory", "lots", "--", "true"}, "--max-memory"},
		{[]string{"setup", "--no-install", "--max-vms", "-5"}, "--max-vms -5"},
	} {
		r = smolvmRun(t, home, "", c.args...)
		if r.code != 3 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("smolvm %s: exit %d, stderr %q; want exit 3 naming %q", strings.Join(c.args, " "), r.code, r.stderr, c.want)
		}
	}
	r = smolvmRun(t, home, "", "create", "--name", "bad name")
	if r.code == 0 || !strings.Contains(r.stderr, "name") {
		t.Errorf("create with an invalid name: exit %d, stderr %q", r.code, r.stderr)
	}
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("refused commands left VMs: %+v", vms)
	}
}

func TestCLIRun(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	r := mustOK(t, home, "", "run", "--", "uname", "-a")
	if !strings.HasPrefix(r.stdout, "Linux") || strings.Count(r.stdout, "\n") != 1 {
		t.Errorf("run -- uname -a printed %q, want one line starting with Linux", r.stdout)
	}
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("run left VMs behind: %+v", vms)
	}
	if r := mustOK(t, home, "", "ls", "-q"); r.stdout != "" {
		t.Errorf("ls -q after run printed %q", r.stdout)
	}
}

// TestCLIHomeFlag: --home is the state folder of every command (the CLI
// hands it to its Host), whatever $SMOLVM_HOME says.
func TestCLIHomeFlag(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	env := t.TempDir() // $SMOLVM_HOME of the runs: must stay untouched
	id := strings.TrimSpace(mustOK(t, env, "", "--home", home, "create", "--name", "flagvm", "-m", "256").stdout)
	t.Cleanup(func() { smolvmRun(t, env, "", "--home", home, "rm", "-f", id) })
	if r := mustOK(t, env, "", "--home", home, "exec", "flagvm", "--", "hostname"); r.stdout != "flagvm\n" {
		t.Errorf("exec in the VM of --home printed %q", r.stdout)
	}
	if vms := listVMs(t, home); len(vms) != 1 || vms[0].ID != id {
		t.Errorf("the state folder of --home lists %+v, want VM %s", vms, id)
	}
	mustOK(t, env, "", "--home", home, "rm", "-f", "flagvm")
	if ents, _ := os.ReadDir(env); len(ents) != 0 {
		t.Errorf("$SMOLVM_HOME got %d files though --home was given", len(ents))
	}
}

var idRE = regexp.MustCompile(`^[0-9a-f]{12}\n$`)

func TestCLIPersistentVM(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)

	r := mustOK(t, home, "", "create", "--name", "clivm")
	if !idRE.MatchString(r.stdout) {
		t.Fatalf("create printed %q on stdout, want the id alone", r.stdout)
	}
	id := strings.TrimSpace(r.stdout)

	t.Run("ExecExitCode", func(t *testing.T) {
		r := smolvmRun(t, home, "", "exec", id, "--", "sh", "-c", "exit 7")
		if r.code != 7 {
			t.Errorf("exec -- sh -c 'exit 7' exited %d, want 7", r.code)
		}
		r = smolvmRun(t, home, "", "exec", "clivm", "--", "sh -c 'echo out; echo err >&2; exit 3'")
		if r.code != 3 || r.stdout != "out\n" || r.stderr != "err\n" {
			t.Errorf("exec by name of a shell line: %+v", r)
		}
		// A command that cannot start exits as in a shell, over the fast
		// lane (no stdin) and over gRPC (stdin forwarded).
		for _, c := range []struct {
			stdin, cmd string
			code       int
			says       string
		}{
			{"", "no-such-command", 127, "not found"},
			{"x\n", "no-such-command", 127, "not found"},
			{"", "/etc/passwd", 126, "permission denied"},
		} {
			args := []string{"exec", id, "--", c.cmd}
			if c.stdin != "" {
				args = []string{"exec", "-i", id, "--", c.cmd}
			}
			r := smolvmRun(t, home, c.stdin, args...)
			if r.code != c.code || !strings.Contains(r.stderr, c.says) {
				t.Errorf("exec %s (stdin %q): exit %d, stderr %q; want %d and %q", c.cmd, c.stdin, r.code, r.stderr, c.code, c.says)
			}
		}
	})

	t.Run("ExecStdin", func(t *testing.T) {
		r := mustOK(t, home, "hi\n", "exec", id, "--", "cat")
		if r.stdout != "hi\n" {
			t.Errorf("echo hi | exec -- cat printed %q", r.stdout)
		}
	})

	t.Run("ExecEnvWorkdir", func(t *testing.T) {
		r := mustOK(t, home, "", "exec", "-e", "FOO=bar baz", "-w", "/tmp", id, "--", "sh", "-c", `echo "$FOO"; pwd`)
		if r.stdout != "bar baz\n/tmp\n" {
			t.Errorf("exec -e -w printed %q", r.stdout)
		}
	})

	t.Run("List", func(t *testing.T) {
		vms := listVMs(t, home)
		if len(vms) != 1 || vms[0].ID != id || vms[0].Name != "clivm" || vms[0].State != "running" {
			t.Errorf("ls --json = %+v; want the running VM %s", vms, id)
		}
		if r := mustOK(t, home, "", "ls"); !strings.Contains(r.stdout, id) || !strings.Contains(r.stdout, "running") {
			t.Errorf("ls does not show the VM:\n%s", r.stdout)
		}
	})

	t.Run("Info", func(t *testing.T) {
		r := mustOK(t, home, "", "info", "--json", id)
		var in vmJSON
		if err := json.Unmarshal([]byte(r.stdout), &in); err != nil {
			t.Fatalf("info --json is not JSON: %v\n%s", err, r.stdout)
		}
		tm := in.Timings
		if in.ID != id || tm.Create <= 0 || tm.Launch <= 0 || tm.FirstCommand <= 0 || tm.CreateToFirstCommand <= 0 {
			t.Errorf("info --json = %+v; want the VM with its phase timings", in)
		}
		if r := mustOK(t, home, "", "info", "clivm"); !strings.Contains(r.stdout, "first command") {
			t.Errorf("info does not show timings:\n%s", r.stdout)
		}
	})

	t.Run("Logs", func(t *testing.T) {
		r := mustOK(t, home, "", "logs", id)
		if strings.TrimSpace(r.stdout) == "" {
			t.Error("logs printed no console output")
		}
	})

	t.Run("PauseResume", func(t *testing.T) {
		// A command running across the pause waits for the frozen guest
		// and finishes after resume.
		cmd := exec.Command(testutil.Binary(t), "exec", id, "--", "sh", "-c",
			"echo started; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after-resume")
		cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill() })
		lines := bufio.NewReader(stdout)
		if l, err := lines.ReadString('\n'); l != "started\n" {
			t.Fatalf("exec printed %q (%v), want \"started\"", l, err)
		}
		mustOK(t, home, "", "pause", "clivm")
		if vms := listVMs(t, home); len(vms) != 1 || vms[0].State != "paused" {
			t.Fatalf("ls --json after pause: %+v; want the VM paused", vms)
		}
		// A new call that needs the guest fails at once (exit 4) and
		// says what to do, whatever its timeout; so does a snapshot.
		for _, args := range [][]string{
			{"exec", "--timeout", "3s", id, "--", "true"},
			{"exec", "-i", "clivm", "--", "cat"},
			{"cp", "clivm:/etc/hostname", t.TempDir()},
			{"env", "ls", "clivm"},
			{"snapshot", "create", "clivm", "paused-snap"},
		} {
			r := smolvmRunWithin(t, time.Minute, home, "x\n", args...)
			if r.code != 4 || !strings.Contains(r.stderr, "paused") || !strings.Contains(r.stderr, "smolvm resume clivm") || strings.Contains(r.stderr, "rpc error") {
				t.Errorf("smolvm %s on a paused VM: exit %d, stderr %q; want exit 4 naming 'smolvm resume clivm'", strings.Join(args, " "), r.code, r.stderr)
			}
		}
		mustOK(t, home, "", "resume", id)
		mustOK(t, home, "", "exec", id, "--", "touch", "/tmp/go")
		rest, _ := io.ReadAll(lines)
		if err := cmd.Wait(); err != nil || string(rest) != "after-resume\n" {
			t.Errorf("exec across pause and resume: %v, %q", err, rest)
		}
		if vms := listVMs(t, home); len(vms) != 1 || vms[0].State != "running" {
			t.Errorf("ls --json after resume: %+v; want the VM running", vms)
		}
	})

	t.Run("PortTaken", func(t *testing.T) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		port := ln.Addr().(*net.TCPAddr).Port
		// Through the supervisor's API and through its ready pipe, a taken
		// host port is "in use": exit 5.
		r := smolvmRun(t, home, "", "port", "expose", "clivm", fmt.Sprintf("%d:80", port))
		if r.code != 5 || !strings.Contains(r.stderr, "already in use") {
			t.Errorf("port expose of a taken host port: exit %d, stderr %q; want exit 5 saying it is in use", r.code, r.stderr)
		}
		r = smolvmRun(t, home, "", "create", "--name", "taken", "-p", fmt.Sprintf("%d:80", port))
		if r.code != 5 || !strings.Contains(r.stderr, "already in use") {
			t.Errorf("create -p with a taken host port: exit %d, stderr %q; want exit 5 saying it is in use", r.code, r.stderr)
		}
		if vms := listVMs(t, home); len(vms) != 1 {
			t.Errorf("VMs after the refused create: %+v", vms)
		}
	})

	t.Run("Rm", func(t *testing.T) {
		r := smolvmRun(t, home, "", "rm", id)
		if r.code == 0 || !strings.Contains(r.stderr, "-f") {
			t.Errorf("rm of a running VM without -f: exit %d, stderr %q; want a failure naming -f", r.code, r.stderr)
		}
		if vms := listVMs(t, home); len(vms) != 1 || vms[0].State != "running" {
			t.Fatalf("a refused rm changed the VM: %+v", vms)
		}
		mustOK(t, home, "", "rm", "-f", id)
		assertRemoved(t, home)
		r = smolvmRun(t, home, "", "exec", id, "--", "true")
		if r.code != 2 {
			t.Errorf("exec on a removed VM: exit %d, want 2 (not found)", r.code)
		}
	})
}

// TestCLIUnresponsiveSupervisor: a VM whose supervisor stops answering
// (SIGSTOP) is shown as such, calls into it fail within seconds saying
// what to do, and rm -f removes it and everything it held.
func TestCLIUnresponsiveSupervisor(t *testing.T) {
	t.Parallel()
	home := testutil.Home(t)
	id := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "stuck").stdout)
	var in struct {
		SupervisorPID int `json:"supervisor_pid"`
		HypervisorPID int `json:"hypervisor_pid"`
	}
	if err := json.Unmarshal([]byte(mustOK(t, home, "", "info", "--json", id).stdout), &in); err != nil || in.SupervisorPID == 0 || in.HypervisorPID == 0 {
		t.Fatalf("info --json: %+v, %v; want the supervisor's and QEMU's pids", in, err)
	}
	if err := syscall.Kill(in.SupervisorPID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever the test found, leave no stopped process behind.
		for _, pid := range []int{in.SupervisorPID, in.HypervisorPID} {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), id) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})

	r := smolvmRunWithin(t, time.Minute, home, "", "ls", "--json")
	var vms []vmJSON
	if err := json.Unmarshal([]byte(r.stdout), &vms); err != nil || len(vms) != 1 || vms[0].State != "unresponsive" ||
		!strings.Contains(vms[0].Reason, "smolvm rm -f stuck") {
		t.Errorf("ls --json with the supervisor stopped: %+v (%v); want the VM unresponsive, naming 'smolvm rm -f stuck'", vms, err)
	}
	for _, args := range [][]string{
		{"exec", "stuck", "--", "true"},
		{"exec", "--timeout", "3s", "stuck", "--", "true"},
		{"cp", "stuck:/etc/hostname", t.TempDir()},
		{"stop", "stuck"},
	} {
		r := smolvmRunWithin(t, time.Minute, home, "", args...)
		if r.code == 0 || !strings.Contains(r.stderr, "not responding") || !strings.Contains(r.stderr, "smolvm rm -f stuck") || strings.Contains(r.stderr, "rpc error") {
			t.Errorf("smolvm %s with the supervisor stopped: exit %d, stderr %q; want a failure saying it is not responding and naming 'smolvm rm -f stuck'",
				strings.Join(args, " "), r.code, r.stderr)
		}
	}

	smolvmRunWithin(t, time.Minute, home, "", "rm", "-f", "stuck")
	assertRemoved(t, home)
	for _, pid := range []int{in.SupervisorPID, in.HypervisorPID} {
		if testutil.PidAlive(pid) {
			t.Errorf("process %d (supervisor or QEMU) alive after rm -f", pid)
		}
	}
}

// assertRemoved checks that rm -f left nothing of home's VMs: no VM, no
// state folder, no process.
func assertRemoved(t *testing.T, home string) {
	t.Helper()
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("VMs after rm -f: %+v", vms)
	}
	if ents, _ := os.ReadDir(home + "/vms"); len(ents) != 0 {
		t.Errorf("state folders after rm -f: %v", ents)
	}
	if left := testutil.WaitNoProcesses(home, 30*time.Second); len(left) > 0 {
		t.Errorf("processes after rm -f: %v", left)
	}
}

// TestBenchOpensNoStore: bench opens the state folder only through the
// library, so 'bench --idle N --idle-bin OLD' leaves another build's
// folder as that build made it (this build's store would upgrade its
// database past what OLD reads).
func TestBenchOpensNoStore(t *testing.T) {
	home := t.TempDir()
	r := smolvmRunWithin(t, time.Minute, home, "", "bench", "--idle", "1", "--idle-bin", "/bin/false", "--idle-window", "1s", "--idle-settle", "1s")
	if r.code == 0 || !strings.Contains(r.stderr, "/bin/false") && !strings.Contains(r.stderr, "exit status 1") {
		t.Errorf("bench with an idle binary that fails: exit %d, %q; want a failure naming it", r.code, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(home, "smolvm.db")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bench --idle-bin made or opened this build's store in %s: %v", home, err)
	}
}
