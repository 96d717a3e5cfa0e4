package smolvm_test

// Real-VM tests of the sandbox environment and of the interactive CLI
// (smolvm shell, exec -it) on a host pseudo-terminal.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestEnvSetUnsetList(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := stCtx(t)
	t.Cleanup(func() { _ = vm.UnsetEnv(ctx, "SMV_A", "SMV_B") })

	if err := vm.SetEnv(ctx, map[string]string{"SMV_A": "1", "SMV_B": "it's a b"}); err != nil {
		t.Fatal(err)
	}
	env, err := vm.Env(ctx)
	if err != nil || env["SMV_A"] != "1" || env["SMV_B"] != "it's a b" {
		t.Fatalf("Env = %v, %v", env, err)
	}
	res, err := vm.Run(ctx, `echo "$SMV_A|$SMV_B"`)
	if err != nil || string(res.Stdout) != "1|it's a b\n" {
		t.Errorf("exec sees %q, %v", res.Stdout, err)
	}
	// A login shell sees it too (the profile snippet), and an exec's own
	// variables win over it.
	c := vm.Command(ctx, "sh", "-l", "-c", `echo "$SMV_A|$SMV_B"`)
	c.Env = []string{"SMV_A=override"}
	out, err := c.Output()
	if err != nil || string(out) != "override|it's a b\n" {
		t.Errorf("login shell sees %q, %v", out, err)
	}

	if err := vm.UnsetEnv(ctx, "SMV_A", "SMV_NEVER_SET"); err != nil {
		t.Fatal(err)
	}
	env, err = vm.Env(ctx)
	if _, ok := env["SMV_A"]; ok || err != nil || env["SMV_B"] == "" {
		t.Errorf("after unset: %v, %v", env, err)
	}
	res, err = vm.Run(ctx, `echo "${SMV_A-unset}"`)
	if err != nil || string(res.Stdout) != "unset\n" {
		t.Errorf("exec after unset sees %q, %v", res.Stdout, err)
	}

	for _, bad := range []map[string]string{{"1BAD": "x"}, {"A-B": "x"}, {"SMV_NL": "a\nb"}} {
		if err := vm.SetEnv(ctx, bad); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("SetEnv(%q) = %v, want ErrInvalid", bad, err)
		}
	}
	if _, err := smolvm.ParseEnv([]string{"NOEQUALS"}); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("ParseEnv(NOEQUALS) = %v", err)
	}
}

func TestCLIEnv(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	name := vm.Name()
	t.Cleanup(func() { _ = vm.UnsetEnv(stCtx(t), "SMV_CLI", "SMV_CLI2") })

	if _, errs, code := cli(t, nil, "env", "set", name, "SMV_CLI=hello world", "SMV_CLI2=x=y"); code != 0 {
		t.Fatalf("env set: exit %d: %s", code, errs)
	}
	out, errs, code := cli(t, nil, "env", "ls", name)
	if code != 0 || !strings.Contains(out, "SMV_CLI=hello world\n") || !strings.Contains(out, "SMV_CLI2=x=y\n") {
		t.Errorf("env ls: exit %d, %q %s", code, out, errs)
	}
	out, _, _ = cli(t, nil, "env", "ls", name, "--json")
	var m map[string]string
	if err := json.Unmarshal([]byte(out), &m); err != nil || m["SMV_CLI"] != "hello world" {
		t.Errorf("env ls --json: %q, %v", out, err)
	}
	if out, errs, code := cli(t, nil, "exec", name, "--", "sh", "-c", "echo $SMV_CLI"); code != 0 || out != "hello world\n" {
		t.Errorf("exec after env set: %q exit %d %s", out, code, errs)
	}
	if _, errs, code := cli(t, nil, "env", "unset", name, "SMV_CLI"); code != 0 {
		t.Fatalf("env unset: exit %d: %s", code, errs)
	}
	if out, _, _ := cli(t, nil, "env", "ls", name); strings.Contains(out, "SMV_CLI=") {
		t.Errorf("env ls after unset: %q", out)
	}
	if _, errs, code := cli(t, nil, "env", "set", name, "BAD"); code != 3 || !strings.Contains(errs, "KEY=VALUE") {
		t.Errorf("env set BAD: exit %d %q", code, errs)
	}
}

// onPTY runs bin/smolvm on a host pseudo-terminal, types input once prompt
// appears in the output (at once if prompt is ""), and returns everything
// it printed and its exit code.
func onPTY(t *testing.T, prompt, input string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+testutil.SharedHome())
	f, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 30, Cols: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var mu sync.Mutex
	var out bytes.Buffer
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		buf := make([]byte, 4096)
		for {
			n, err := f.Read(buf)
			mu.Lock()
			out.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	if prompt != "" {
		_ = testutil.Poll(60*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return strings.Contains(out.String(), prompt)
		})
	}
	if input != "" {
		_, _ = io.WriteString(f, input)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		werr = <-done
		t.Errorf("smolvm %s did not end", strings.Join(args, " "))
	}
	f.Close()
	<-copied
	code := 0
	var ee *exec.ExitError
	if errors.As(werr, &ee) {
		code = ee.ExitCode()
	}
	mu.Lock()
	defer mu.Unlock()
	return out.String(), code
}

func TestCLIShellAndExecTTY(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	name := vm.Name()

	out, code := onPTY(t, "", "", "exec", "-it", name, "--", "sh", "-c", "tty; stty size")
	if code != 0 || !regexp.MustCompile(`/dev/pts/\d+\r\n30 100\r\n`).MatchString(out) {
		t.Errorf("exec -it: exit %d, output %q; want /dev/pts/N and the host terminal's size 30 100", code, out)
	}

	out, code = onPTY(t, "#", "tty; echo \"size $(stty size)\"; exit 7\r", "shell", name)
	if code != 7 {
		t.Errorf("shell: exit %d, want 7 (the shell's own); output %q", code, out)
	}
	if !regexp.MustCompile(`/dev/pts/\d+`).MatchString(out) || !strings.Contains(out, "size 30 100") {
		t.Errorf("shell output %q: want a /dev/pts tty of size 30 100", out)
	}
}
