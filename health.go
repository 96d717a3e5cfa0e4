package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// A VM's supervisor can stop answering (SIGSTOP, a debugger, a host out
// of memory) while its process lives on. Nothing that talks to it may wait
// for it without a bound: a connection to api.sock must be up within
// connectTimeout, an idle connection is pinged (keepalive), ls and info
// ask each supervisor for its status within probeTimeout, and a call that
// found no answer reports it as "not responding" with the way out
// ('smolvm rm -f', which kills the supervisor: see killSupervisor).

const (
	// connectTimeout bounds the set-up of a connection to api.sock
	// (gRPC's default is 20 s).
	connectTimeout = 3 * time.Second
	// probeTimeout bounds a status probe of a supervisor.
	probeTimeout = 2 * time.Second
)

// dialAPI makes a client connection to a VM's API socket. Errors of its
// calls come as errdefs' kinds, never as raw gRPC text.
func dialAPI(dir string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+filepath.Join(dir, supervisor.APISocket),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(supervisor.MaxMessage), grpc.MaxCallSendMsgSize(supervisor.MaxMessage)),
		grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(4<<20),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: connectTimeout}),
		// A connection whose supervisor stops answering fails its calls
		// within Time+Timeout (the server permits pings every 5 s).
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithChainUnaryInterceptor(errdefs.UnaryClientInterceptor),
		grpc.WithChainStreamInterceptor(errdefs.StreamClientInterceptor),
	)
}

// supervisorProblem returns an error wrapping ErrUnavailable when the
// supervisor of a live VM in another process does not answer a status
// probe within probeTimeout, and nil when it answers or is not there.
func supervisorProblem(ctx context.Context, rec *store.VM) error {
	pid := rec.SupervisorPID
	if !rec.Live() || pid == os.Getpid() || !processAlive(pid) {
		return nil
	}
	if stopped(pid) {
		return unresponsive(rec, "stopped: SIGSTOP or a debugger")
	}
	conn, err := dialAPI(rec.Dir)
	if err != nil {
		return nil
	}
	defer conn.Close()
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	_, err = controlpb.NewControlClient(conn).Status(pctx, &controlpb.StatusRequest{})
	switch {
	case err == nil, ctx.Err() != nil:
		return nil
	case !processAlive(pid):
		return nil // it just ended: the state row says how
	case stopped(pid):
		return unresponsive(rec, "stopped: SIGSTOP or a debugger")
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, errdefs.ErrUnavailable):
		return unresponsive(rec, fmt.Sprintf("no answer within %s", probeTimeout))
	}
	return nil // it answered, with an error: it is alive
}

func unresponsive(rec *store.VM, why string) error {
	return fmt.Errorf("supervisor of VM %s is %w (pid %d, %s): 'smolvm rm -f %s' kills it", rec.Name, ErrUnavailable, rec.SupervisorPID, why, rec.Name)
}

// noAnswer is the error of a call that its timeout ended before the VM
// answered: the supervisor's problem if it has one.
func (vm *VM) noAnswer(what string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*probeTimeout)
	defer cancel()
	if rec, err := vm.st.GetVM(ctx, vm.id); err == nil {
		if rec.State != store.StateRunning {
			return fmt.Errorf("%s: %w", what, notRunning(rec))
		}
		if p := supervisorProblem(ctx, rec); p != nil {
			return fmt.Errorf("%s: %w", what, p)
		}
	}
	return fmt.Errorf("%s: VM %s did not answer within the timeout of %s: %w", what, vm.name, timeout, ErrUnavailable)
}

// maxProbes bounds the supervisors probed at once (a connection and a
// status call each): a host of hundreds of VMs is probed in waves.
const maxProbes = 16

// probeAll runs supervisorProblem on the live VMs of recs, maxProbes at a
// time, and returns the problems by VM id.
func probeAll(ctx context.Context, recs []*store.VM) map[string]error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	out := map[string]error{}
	sem := make(chan struct{}, maxProbes)
	for _, r := range recs {
		if !r.Live() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := supervisorProblem(ctx, r); err != nil {
				mu.Lock()
				out[r.ID] = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// markUnresponsive shows a probe's problem in a VM's info.
func markUnresponsive(in *Info, problem error) {
	if problem != nil {
		in.State, in.Reason = StateUnresponsive, problem.Error()
	}
}

// procState is the state letter of a process in /proc/PID/stat (R, S, T
// for stopped, Z…), or 0.
// stopped says whether process pid is stopped (SIGSTOP) or traced.
func stopped(pid int) bool {
	s := procState(pid)
	return s == 'T' || s == 't'
}

func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2]
	}
	return 0
}

// killSupervisor ends a VM whose supervisor does not answer: SIGKILL to
// the supervisor (only if the pid is still this VM's supervisor, not a
// recycled one) and to its QEMU (which PR_SET_PDEATHSIG kills too), then
// what the supervisor's teardown would have removed (API socket, TAP and
// nftables rules), and records the VM as stopped.
func killSupervisor(ctx context.Context, st *store.Store, rec *store.VM) error {
	if pid := rec.SupervisorPID; isSupervisorOf(pid, rec.ID) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill supervisor of VM %s (pid %d): %w", rec.Name, pid, err)
		}
	}
	killStrayHypervisor(rec.HypervisorPID, rec.ID)
	deadline := time.Now().Add(10 * time.Second)
	for (isSupervisorOf(rec.SupervisorPID, rec.ID) && processAlive(rec.SupervisorPID)) ||
		(isHypervisorOf(rec.HypervisorPID, rec.ID) && processAlive(rec.HypervisorPID)) {
		if time.Now().After(deadline) {
			return fmt.Errorf("VM %s: supervisor (pid %d) or QEMU (pid %d) did not exit after SIGKILL", rec.Name, rec.SupervisorPID, rec.HypervisorPID)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kill VM %s: %w", rec.Name, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	_ = os.Remove(filepath.Join(rec.Dir, supervisor.APISocket))
	if err := releaseNetwork(ctx, st, rec.ID); err != nil {
		return err
	}
	_, err := st.UpdateVM(context.WithoutCancel(ctx), rec.ID, func(v *store.VM) error {
		v.State, v.Reason, v.HypervisorPID = store.StateStopped, "killed: its supervisor was not responding", 0
		return nil
	})
	return err
}
