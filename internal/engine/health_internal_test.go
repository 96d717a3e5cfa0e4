package engine

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// sleeper is a live process that is no VM's supervisor.
func sleeper(t *testing.T) int {
	t.Helper()
	c := exec.Command("sleep", "600")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	return c.Process.Pid
}

// A supervisor whose socket accepts but never answers is unresponsive
// (the probe gives up after ProbeTimeout); one that answers, even with an
// error, is not.
func TestSupervisorProblem(t *testing.T) {
	ctx := context.Background()
	silent := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(silent, supervisor.APISocket))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		var held []net.Conn // accepted, never answered
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	rec := &store.VM{ID: "0123456789ab", Name: "quiet", State: store.StateRunning, Dir: silent, SupervisorPID: sleeper(t)}
	err = SupervisorProblem(ctx, rec)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "no answer within") || !strings.Contains(err.Error(), "'smolvm rm -f quiet'") {
		t.Errorf("probe of a silent supervisor = %v; want errdefs.ErrUnavailable saying it did not answer and naming 'smolvm rm -f quiet'", err)
	}

	answering := t.TempDir()
	ln2, err := net.Listen("unix", filepath.Join(answering, supervisor.APISocket))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor))
	controlpb.RegisterControlServer(srv, controlpb.UnimplementedControlServer{}) // Status: an error
	go func() { _ = srv.Serve(ln2) }()
	defer srv.Stop()
	rec.Dir = answering
	if err := SupervisorProblem(ctx, rec); err != nil {
		t.Errorf("probe of a supervisor that answers = %v; want nil", err)
	}
	rec.State = store.StateStopped
	rec.Dir = silent
	if err := SupervisorProblem(ctx, rec); err != nil {
		t.Errorf("probe of a stopped VM = %v; want nil (nothing to probe)", err)
	}
}

// KillSupervisor kills only a process that is this VM's supervisor: a pid
// recycled by another program is left alone, and the VM is still cleaned
// up and recorded as stopped.
func TestKillSupervisorChecksThePid(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec := &store.VM{Name: "recycled", State: store.StateRunning, Dir: t.TempDir()}
	if err := st.CreateVM(ctx, rec); err != nil {
		t.Fatal(err)
	}
	other := sleeper(t)
	rec.SupervisorPID, rec.HypervisorPID = other, other
	if err := KillSupervisor(ctx, st, rec); err != nil {
		t.Fatal(err)
	}
	if !ProcessAlive(other) {
		t.Error("KillSupervisor killed a process that was not the VM's supervisor")
	}
	got, err := st.GetVM(ctx, rec.ID)
	if err != nil || got.State != store.StateStopped || !strings.Contains(got.Reason, "not responding") {
		t.Errorf("VM after KillSupervisor = %+v, %v; want it stopped with the reason", got, err)
	}
}
