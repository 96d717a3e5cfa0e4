package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// SupervisorBinary finds the smolvm CLI that runs detached supervisors
// (with SupervisorProgram when one lies beside it: see
// supervisorProgram).
func SupervisorBinary(explicit string) (string, error) {
	if explicit != "" {
		return explicit, nil
	}
	if p := os.Getenv("SMOLVM_BIN"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil && filepath.Base(exe) == "smolvm" {
		return exe, nil
	}
	if p, err := exec.LookPath("smolvm"); err == nil {
		return p, nil
	}
	return "", errors.New("persistent VMs need the smolvm binary: put it in PATH, set $SMOLVM_BIN or set Config.SupervisorBinary")
}

// SupervisorProgram is the small binary that runs detached supervisors
// (cmd/smolvm-supervisor: the CLI's __supervise command without the rest
// of the CLI, whose servers and their libraries would cost every idle
// VM's supervisor 3.4–4.1 MiB more; docs/benchmarks.md). make build puts
// it beside smolvm.
const SupervisorProgram = "smolvm-supervisor"

// supervisorProgram is the program that runs the supervisor for the smolvm
// binary bin: SupervisorProgram beside bin, or beside the file bin links
// to, or in ../libexec/smolvm from either (where AgentBinary also looks);
// else bin itself, whose __supervise command does the same.
func supervisorProgram(bin string) string {
	dirs := []string{filepath.Dir(bin)}
	if real, err := filepath.EvalSymlinks(bin); err == nil && filepath.Dir(real) != dirs[0] {
		dirs = append(dirs, filepath.Dir(real))
	}
	for _, dir := range dirs {
		for _, p := range []string{filepath.Join(dir, SupervisorProgram), filepath.Join(dir, "..", "libexec", "smolvm", SupervisorProgram)} {
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
				return p
			}
		}
	}
	return bin
}

// ErrSupervisorDied is a supervisor process that ended before it reported
// the VM ready or why not (it was killed).
var ErrSupervisorDied = errors.New("supervisor exited before the VM was ready")

// SpawnSupervisor starts `smolvm-supervisor __supervise ID` (see
// supervisorProgram; `smolvm __supervise ID` with bin, the smolvm binary
// SupervisorBinary found, when there is none) detached from this process
// and waits until it reports the VM ready (or why not) on a pipe.
func SpawnSupervisor(ctx context.Context, bin, home, id string, started, createDone time.Time, log *slog.Logger) error {
	bin = supervisorProgram(bin)
	log.Debug("start supervisor", "program", bin)
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	logf, err := os.OpenFile(filepath.Join(home, "vms", id, supervisor.LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		w.Close()
		return fmt.Errorf("open supervisor log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, SuperviseCommand, id,
		"--started", started.Format(time.RFC3339Nano), "--create-done", createDone.Format(time.RFC3339Nano))
	cmd.Env = append(os.Environ(), "SMOLVM_HOME="+home)
	if log.Enabled(ctx, slog.LevelDebug) {
		// A caller that logs its phases gets the supervisor's in its log.
		cmd.Env = append(cmd.Env, "SMOLVM_DEBUG=1")
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w} // fd 3
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start supervisor %s: %w", bin, err)
	}
	w.Close()
	pid := cmd.Process.Pid
	_ = cmd.Process.Release()
	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		ch <- result{strings.TrimSpace(line), err}
	}()
	select {
	case res := <-ch:
		if valid, err := errdefs.ParseReady(res.line); valid {
			return err
		}
		return fmt.Errorf("%w: see %s", ErrSupervisorDied, filepath.Join(home, "vms", id, supervisor.LogFile))
	case <-ctx.Done():
		_ = syscall.Kill(pid, syscall.SIGKILL)
		return fmt.Errorf("create VM: %w", ctx.Err())
	}
}
