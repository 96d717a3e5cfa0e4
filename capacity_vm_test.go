package smolvm_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// smolvmCmd runs the CLI against home; it returns the exit code and
// stdout, then stderr after it (safe from several goroutines).
func smolvmCmd(ctx context.Context, t *testing.T, home string, args ...string) (int, string) {
	cmd := exec.CommandContext(ctx, testutil.Binary(t), append([]string{"--home", home}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		code = -1
	}
	return code, out.String() + "\n" + errOut.String()
}

// created is the VM a successful 'smolvm create' printed (its first line).
func created(out string) string { return strings.TrimSpace(strings.SplitN(out, "\n", 2)[0]) }

// The host's capacity holds over state folders: a VM in one folder
// counts against the limit of a create in another, whether the limit
// comes from Config, a create flag, the host's setting ('smolvm setup
// --max-vms') or the environment; concurrent creates in two folders at
// the limit get in exactly up to it; a refusal names the limit, where it
// was set and the fix, and leaves nothing behind; doctor shows it.
func TestHostCapacity(t *testing.T) {
	// Not parallel: the limits below are the test's host's own (a host
	// folder of its own), and the environment sets some of them.
	t.Setenv(smolvm.HostDirEnv, t.TempDir())
	t.Setenv(smolvm.MaxVMsEnv, "")
	t.Setenv(smolvm.MaxMemoryMiBEnv, "")
	homeA, homeB := testutil.Home(t), testutil.Home(t)
	ctx := testutil.Context(t, 20*time.Minute)
	a := newVM(t, smolvm.Config{Home: homeA, MaxVMs: 1})
	before := stateOf(t, homeB)
	refused := func(what string, err error, want ...string) {
		t.Helper()
		if !errors.Is(err, smolvm.ErrCapacity) {
			t.Errorf("%s: %v, want ErrCapacity", what, err)
			return
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %v\nwant it to say %q", what, err, w)
			}
		}
	}

	// The library, in the other folder.
	_, err := smolvm.New(ctx, smolvm.Config{Home: homeB, MaxVMs: 1})
	refused("a VM in B with MaxVMs 1 while A runs one", err,
		"host at capacity: 1 of 1 VMs running, 1 of them in other state folders", "from Config.MaxVMs", "smolvm rm", "smolvm setup --max-vms")
	_, err = smolvm.New(ctx, smolvm.Config{Home: homeB, MaxMemoryMiB: 600})
	refused("512 MiB in B with 600 MiB for the host", err,
		"512 of 600 MiB of guest memory in use, 512 of it in other state folders", smolvm.MaxMemoryMiBEnv, "--max-memory")

	// The CLI: a create flag, then the host's setting, then the
	// environment.
	code, out := smolvmCmd(ctx, t, homeB, "create", "--max-vms", "1")
	if code != 6 || !strings.Contains(out, "1 of 1 VMs running, 1 of them in other state folders") || !strings.Contains(out, "--max-vms") {
		t.Errorf("create --max-vms 1 in B: exit %d: %s", code, out)
	}
	if code, out := smolvmCmd(ctx, t, homeB, "setup", "--no-install", "--no-warm", "--max-vms", "1"); code != 0 || !strings.Contains(out, "at most 1 VMs") {
		t.Fatalf("setup --max-vms 1: exit %d: %s", code, out)
	}
	code, out = smolvmCmd(ctx, t, homeB, "create")
	if code != 6 || !strings.Contains(out, "1 of 1 VMs running") || !strings.Contains(out, "capacity.json ('smolvm setup --max-vms N')") {
		t.Errorf("create in B with the host's setting of 1: exit %d: %s", code, out)
	}
	code, out = smolvmCmd(ctx, t, homeB, "doctor", "--json")
	var doc struct{ Checks []smolvm.HostCheck }
	if err := json.NewDecoder(strings.NewReader(out)).Decode(&doc); err != nil {
		t.Fatalf("doctor --json: exit %d: %v: %s", code, err, out)
	}
	var capDetail string
	for _, c := range doc.Checks {
		if c.Name == "capacity" {
			capDetail = c.Detail
		}
	}
	if !strings.Contains(capDetail, "past 1 VMs (from the host's setting") || !strings.Contains(capDetail, "now 1 VMs and 512 MiB in 1 state folders") {
		t.Errorf("doctor's capacity: %q", capDetail)
	}
	cmd := exec.CommandContext(ctx, testutil.Binary(t), "--home", homeB, "create")
	cmd.Env = append(os.Environ(), smolvm.MaxVMsEnv+"=1")
	if out, err := cmd.CombinedOutput(); !strings.Contains(string(out), "from $"+smolvm.MaxVMsEnv) {
		t.Errorf("create in B with %s=1: %v: %s", smolvm.MaxVMsEnv, err, out)
	}
	if after := stateOf(t, homeB); !after.equal(before) {
		t.Errorf("refused creates left state in B: %+v, before %+v", after, before)
	}
	if left := testutil.Processes(homeB); len(left) > 0 {
		t.Errorf("refused creates left processes: %v", left)
	}

	// Concurrent creates at the limit: 3 for the host, A holds one; four
	// creates at once, two in each folder: exactly two get in.
	if code, out := smolvmCmd(ctx, t, homeB, "setup", "--no-install", "--no-warm", "--max-vms", "3"); code != 0 {
		t.Fatalf("setup --max-vms 3: exit %d: %s", code, out)
	}
	type result struct {
		home string
		code int
		out  string
	}
	results := make([]result, 4)
	var wg sync.WaitGroup
	for i := range results {
		home := []string{homeA, homeB}[i%2]
		wg.Go(func() {
			code, out := smolvmCmd(ctx, t, home, "create", "--boot-timeout", testutil.BootTimeout.String())
			results[i] = result{home, code, out}
		})
	}
	wg.Wait()
	made := 0
	for _, r := range results {
		switch r.code {
		case 0:
			made++
			t.Cleanup(func() { smolvmCmd(context.Background(), t, r.home, "rm", "-f", created(r.out)) })
		case 6:
			if !strings.Contains(r.out, "host at capacity: 3 of 3 VMs running") {
				t.Errorf("a refused create says: %s", r.out)
			}
		default:
			t.Errorf("create in %s: exit %d: %s", r.home, r.code, r.out)
		}
	}
	if made != 2 {
		t.Errorf("%d of 4 concurrent creates got in with room for 2 on the host: %+v", made, results)
	}

	// A start is held to the limits too, its own flag's first: one of
	// the three stopped, another 'start --max-vms 2' finds 2 of 2.
	for _, r := range results {
		if r.code != 0 {
			continue
		}
		id := created(r.out)
		if code, out := smolvmCmd(ctx, t, r.home, "stop", id); code != 0 {
			t.Fatalf("stop %s: exit %d: %s", id, code, out)
		}
		code, out := smolvmCmd(ctx, t, r.home, "start", "--max-vms", "2", id)
		if code != 6 || !strings.Contains(out, "start VM ") || !strings.Contains(out, "host at capacity: 2 of 2 VMs running") || !strings.Contains(out, "--max-vms") {
			t.Errorf("start --max-vms 2 with 2 running: exit %d: %s", code, out)
		}
		t.Logf("start --max-vms 2 with 2 running: exit %d: %s", code, strings.TrimSpace(out))
		if code, out := smolvmCmd(ctx, t, r.home, "start", id); code != 0 {
			t.Errorf("start within the host's 3: exit %d: %s", code, out)
		}
		break
	}

	// A's VM gone, B has room for one more.
	if err := a.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	code, out = smolvmCmd(ctx, t, homeB, "create", "--boot-timeout", testutil.BootTimeout.String())
	if code != 0 {
		t.Errorf("create in B after A's VM was deleted: exit %d: %s", code, out)
	} else {
		smolvmCmd(ctx, t, homeB, "rm", "-f", created(out))
	}
}
