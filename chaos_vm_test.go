package smolvm_test

// Chaos: kill -9 of the supervisor, of QEMU and of the CLI at each phase
// of a VM's life (create, restore, exec, snapshot, delete). Whatever dies,
// `smolvm ls` must then tell the truth (a VM it lists as running has its
// processes and answers; one it lists as failed or stopped has none; no
// process of the state folder is unaccounted for), and `smolvm cleanup`,
// with `rm -f` of what is left as a user would, must leave nothing behind
// (leaks.Take before and after).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/leaks"
	"github.com/smolvm/smolvm/internal/testutil"
)

const (
	victimSupervisor = "supervisor"
	victimQEMU       = "qemu"
	victimCLI        = "cli"
)

// chaos runs the CLI against one state folder.
type chaos struct {
	t    *testing.T
	home string
	bin  string
	// matrix collects one line per case, logged at the end.
	matrix []string
}

func TestChaos(t *testing.T) {
	home := testutil.Home(t)
	c := &chaos{t: t, home: home, bin: testutil.Binary(t)}
	ctx := testutil.Context(t, 30*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("setup with the warm snapshot: %v", err)
	}
	// A snapshot of its own to restore from (the warm one is New's).
	src := strings.TrimSpace(c.mustOK(t, "create", "--name", "src").stdout)
	c.mustOK(t, "snapshot", "create", "src", "base")
	c.mustOK(t, "rm", "-f", src)
	base, err := leaks.Take(ctx, home)
	if err != nil {
		t.Fatal(err)
	}
	for _, phase := range []string{"create", "restore", "exec", "snapshot", "delete"} {
		for _, victim := range []string{victimSupervisor, victimQEMU, victimCLI} {
			t.Run(phase+"/"+victim, func(t *testing.T) { c.run(t, ctx, base, phase, victim) })
		}
	}
	t.Logf("chaos matrix (phase, victim killed: the CLI's exit; what ls said; cleanup):\n%s", strings.Join(c.matrix, "\n"))
}

// run is one case: the operation of phase, started with the CLI, and
// victim killed with SIGKILL in its midst.
func (c *chaos) run(t *testing.T, ctx context.Context, base *leaks.Stock, phase, victim string) {
	name := "c-" + phase + "-" + victim
	var id string // the case's VM, once known
	var args []string
	switch phase {
	case "create":
		args = []string{"create", "--name", name}
	case "restore":
		args = []string{"snapshot", "restore", "base", "--name", name}
	default:
		id = strings.TrimSpace(c.mustOK(t, "create", "--name", name).stdout)
		switch phase {
		case "exec":
			args = []string{"exec", name, "--", "sh", "-c", "echo started; exec sleep 600"}
		case "snapshot":
			// Memory in use, so that the snapshot takes a while.
			c.mustOK(t, "exec", name, "--", "sh", "-c", "head -c 64m /dev/zero | tr '\\0' x > /tmp/fill")
			args = []string{"snapshot", "create", name, "s-" + victim}
		case "delete":
			args = []string{"rm", "-f", name}
		}
	}

	cmd := exec.Command(c.bin, args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+c.home)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{}) // closed when the CLI has exited, with waitErr
	var waitErr error
	var out bytes.Buffer
	started := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			out.WriteString(sc.Text() + "\n")
			if sc.Text() == "started" && out.Len() == len("started\n") {
				close(started)
			}
		}
		waitErr = cmd.Wait()
		close(exited)
	}()

	// The moment: poll for the sign that the operation is under way.
	var moment func() bool
	switch phase {
	case "create", "restore":
		switch victim {
		case victimQEMU:
			moment = func() bool { return c.pid(victimQEMU, "") > 0 }
		default: // the supervisor runs: the CLI waits for it to report
			moment = func() bool { return c.pid(victimSupervisor, "") > 0 }
		}
	case "exec":
		moment = func() bool {
			select {
			case <-started:
				return true
			default:
				return false
			}
		}
	case "snapshot":
		// The migration stream is being written.
		mem := filepath.Join(c.home, "snapshots", "s-"+victim, "memory")
		moment = func() bool { fi, err := os.Stat(mem); return err == nil && fi.Size() > 0 }
	case "delete":
		if victim == victimCLI {
			// The VM is stopped: the CLI removes what it holds.
			moment = func() bool { return c.pid(victimQEMU, id) == 0 }
		} else {
			moment = func() bool { return true } // at once
		}
	}
	var killed string
	if err := testutil.Poll(testutil.BootTimeout, func() bool {
		select {
		case <-exited:
			return true // too late: the operation ended first
		default:
		}
		return moment()
	}); err != nil {
		t.Fatalf("%s %s: the moment to kill never came: %v", phase, victim, err)
	}
	pid := cmd.Process.Pid
	if victim != victimCLI {
		pid = c.pid(victim, id)
	}
	if pid > 0 && syscall.Kill(pid, syscall.SIGKILL) == nil {
		killed = fmt.Sprintf("killed %s %d", victim, pid)
	} else {
		killed = victim + " not found to kill (the operation was over)"
	}
	t.Log(killed)

	// The CLI must end (with an error when its work was cut short), never
	// hang.
	select {
	case <-exited:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("smolvm %s did not exit within 2 minutes after the %s was killed", strings.Join(args, " "), victim)
	}
	exit := "exit 0"
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			exit = "killed"
		} else {
			exit = fmt.Sprintf("exit %d: %s", ee.ExitCode(), firstLine(stderr.String()))
		}
	}
	t.Logf("smolvm %s: %s", strings.Join(args, " "), exit)
	if victim == victimSupervisor && (phase == "exec" || phase == "snapshot") && ee != nil {
		// The call cut short names what happened and the fix, not the
		// transport's words.
		msg := stderr.String()
		if !strings.Contains(msg, "smolvm rm -f") || strings.Contains(msg, "rpc error") || strings.Contains(msg, "EOF") ||
			strings.Contains(msg, "connection closed") || strings.Contains(msg, "error reading from server") {
			t.Errorf("smolvm %s after its supervisor was killed said %q; want the VM's end named, with 'smolvm rm -f'", strings.Join(args, " "), msg)
		}
	}
	if id == "" && phase != "exec" {
		id = strings.TrimSpace(out.String())
	}

	// ls tells the truth.
	vms := c.truth(t)
	state := "gone"
	for _, v := range vms {
		if v.Name == name {
			id, state = v.ID, v.State
			if v.Reason != "" {
				state += " (" + v.Reason + ")"
			}
		}
	}
	c.expect(t, phase, victim, state, exit)
	snap, snapState := "", ""
	if phase == "snapshot" {
		// snapshot ls tells the truth too: a snapshot it lists as
		// complete restores; one whose maker died is interrupted.
		snap = "s-" + victim
		listed := false
		listed, snapState = c.snapshot(t, snap)
		switch {
		case !listed:
			snapState = "gone"
		case snapState == "":
			snapState = "complete"
			c.mustOK(t, "snapshot", "restore", snap, "--name", name+"-clone")
		case snapState != smolvm.SnapshotInterrupted:
			t.Errorf("snapshot %s is listed %s, but the process making it is gone", snap, snapState)
		}
		state += ", snapshot " + snapState
	}

	// cleanup, then rm -f of what is left, leaves nothing.
	cl := c.mustOK(t, "cleanup")
	if snapState == smolvm.SnapshotInterrupted {
		if listed, _ := c.snapshot(t, snap); listed {
			t.Errorf("cleanup left the interrupted snapshot %s", snap)
		}
	}
	for _, v := range c.list(t) {
		c.mustOK(t, "rm", "-f", v.ID)
	}
	if listed, _ := c.snapshot(t, snap); listed {
		c.mustOK(t, "snapshot", "rm", snap) // a complete one, as a user would
	}
	left, _, err := leaks.Wait(ctx, base, leaks.Owned([]string{id}), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	verdict := "nothing left"
	if left.Count() > 0 {
		verdict = "LEFT: " + strings.ReplaceAll(left.String(), "\n", "; ")
		t.Errorf("after cleanup and rm -f, left behind:\n%s", left)
	}
	c.matrix = append(c.matrix, fmt.Sprintf("  %-8s %-10s CLI %s; ls: %s; cleanup: %s; %s",
		phase, victim, exit, state, strings.Join(strings.Fields(cl.stdout+cl.stderr), " "), verdict))
}

// expect checks the state ls reported against what the kill must have
// left: a VM whose supervisor or QEMU was killed is failed (or gone, when
// its creator removed it), and a VM whose CLI was killed runs on.
func (c *chaos) expect(t *testing.T, phase, victim, state, exit string) {
	t.Helper()
	ok := true
	switch {
	case phase == "delete":
		// Whatever was cut short, the VM is on its way out: it may be
		// running still (the kill came first), stopped or gone.
	case victim == victimCLI && phase == "create" || victim == victimCLI && phase == "restore":
		// The supervisor goes on and the VM runs, unless the CLI died
		// before it started the supervisor.
		ok = state == "running" || strings.HasPrefix(state, "failed (creation was interrupted")
	case victim == victimCLI:
		ok = state == "running"
	case victim == victimSupervisor && (phase == "create" || phase == "restore"):
		// Its creator removed it and failed (not booted instead: a
		// killed supervisor is no fault of the warm snapshot).
		ok = state == "gone" && exit != "exit 0"
	case phase == "create" || phase == "restore":
		// Its creator removed it and failed, or it is failed, or New
		// made it again in a QEMU of its own (after a failed restore of
		// the warm snapshot it boots instead) and it runs.
		ok = state == "gone" && exit != "exit 0" || strings.HasPrefix(state, "failed") || state == "running" && exit == "exit 0"
	default:
		ok = strings.HasPrefix(state, "failed")
	}
	if !ok {
		t.Errorf("%s with the %s killed: ls says the VM is %s (CLI %s)", phase, victim, state, exit)
	}
}

// truth polls `smolvm ls --json` until what it says agrees with the
// processes of the state folder, and fails the test when it does not
// within a minute. A VM listed running must also answer a command.
func (c *chaos) truth(t *testing.T) []vmRow {
	t.Helper()
	var vms []vmRow
	var why string
	err := testutil.Poll(time.Minute, func() bool {
		vms = c.list(t)
		why = c.lies(vms)
		return why == ""
	})
	if err != nil {
		t.Fatalf("smolvm ls does not tell the truth: %s", why)
	}
	for _, v := range vms {
		if v.State == "running" {
			if r := c.run1(t, "exec", v.ID, "--", "echo", "ok"); r.code != 0 || r.stdout != "ok\n" {
				t.Errorf("VM %s is listed running but a command in it failed: exit %d, %q %q", v.Name, r.code, r.stdout, r.stderr)
			}
		}
	}
	return vms
}

// lies says how ls disagrees with the processes ("" when it does not).
func (c *chaos) lies(vms []vmRow) string {
	running := map[string]bool{}
	for _, v := range vms {
		sup, qemu := c.pid(victimSupervisor, v.ID), c.pid(victimQEMU, v.ID)
		switch v.State {
		case "running", "paused":
			running[v.ID] = true
			if sup == 0 || qemu == 0 || v.SupervisorPID != sup || v.HypervisorPID != qemu {
				return fmt.Sprintf("VM %s is listed %s with supervisor %d and QEMU %d, but its processes are supervisor %d and QEMU %d",
					v.Name, v.State, v.SupervisorPID, v.HypervisorPID, sup, qemu)
			}
			if _, err := os.Stat(filepath.Join(v.Dir, "api.sock")); err != nil {
				return fmt.Sprintf("VM %s is listed %s but has no API socket: %v", v.Name, v.State, err)
			}
		case "creating":
			return fmt.Sprintf("VM %s is still listed creating", v.Name)
		default:
			if sup != 0 || qemu != 0 {
				return fmt.Sprintf("VM %s is listed %s (%s) but has processes: supervisor %d, QEMU %d", v.Name, v.State, v.Reason, sup, qemu)
			}
		}
	}
	for _, p := range leaks.Processes(c.home) {
		mine := false
		for id := range running {
			if strings.Contains(p, id) {
				mine = true
			}
		}
		if !mine {
			return "a process of the state folder belongs to no running VM: " + p
		}
	}
	return ""
}

// snapshot says whether snapshot ls lists name, and its state.
func (c *chaos) snapshot(t *testing.T, name string) (listed bool, state string) {
	t.Helper()
	var sns []smolvm.SnapshotInfo
	r := c.mustOK(t, "snapshot", "ls", "--json")
	if err := json.Unmarshal([]byte(r.stdout), &sns); err != nil {
		t.Fatalf("snapshot ls --json: %v\n%s", err, r.stdout)
	}
	for _, sn := range sns {
		if sn.Name == name {
			return true, sn.State
		}
	}
	return false, ""
}

// pid finds the supervisor or QEMU process of VM id (of any VM of the
// state folder when id is ""), 0 when there is none.
func (c *chaos) pid(role, id string) int {
	for _, p := range leaks.Processes(c.home) {
		var mine bool
		if role == victimQEMU {
			mine = strings.Contains(p, "qemu") && strings.Contains(p, "smolvm-"+id)
		} else {
			mine = strings.Contains(p, "__supervise "+id)
		}
		if mine {
			pid, _ := strconv.Atoi(strings.Fields(p)[0])
			return pid
		}
	}
	return 0
}

type vmRow struct {
	ID            string `json:"id"`
	Name          string `json:"name"`
	State         string `json:"state"`
	Reason        string `json:"reason"`
	Dir           string `json:"dir"`
	SupervisorPID int    `json:"supervisor_pid"`
	HypervisorPID int    `json:"hypervisor_pid"`
}

func (c *chaos) list(t *testing.T) []vmRow {
	t.Helper()
	var vms []vmRow
	r := c.mustOK(t, "ls", "--json")
	if err := json.Unmarshal([]byte(r.stdout), &vms); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, r.stdout)
	}
	return vms
}

type chaosResult struct {
	stdout, stderr string
	code           int
}

func (c *chaos) run1(t *testing.T, args ...string) chaosResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.BootTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+c.home)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	r := chaosResult{out.String(), errOut.String(), 0}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("smolvm %s: %v", strings.Join(args, " "), err)
	}
	return r
}

func (c *chaos) mustOK(t *testing.T, args ...string) chaosResult {
	t.Helper()
	r := c.run1(t, args...)
	if r.code != 0 {
		t.Fatalf("smolvm %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}
