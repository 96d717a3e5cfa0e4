package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// A VM's supervisor can stop answering (SIGSTOP, a debugger, a host out
// of memory) while its process lives on. Nothing that talks to it may wait
// for it without a bound: a connection to api.sock must be up within
// connectTimeout, an idle connection is pinged (keepalive), ls and info
// ask each supervisor for its status within ProbeTimeout, and a call that
// found no answer reports it as "not responding" with the way out
// ('smolvm rm -f', which kills the supervisor: see KillSupervisor).

const (
	// connectTimeout bounds the set-up of a connection to api.sock
	// (gRPC's default is 20 s).
	connectTimeout = 3 * time.Second
	// ProbeTimeout bounds a status probe of a supervisor.
	ProbeTimeout = 2 * time.Second
)

// DialAPI makes a client connection to a VM's API socket. Errors of its
// calls come as errdefs' kinds, never as raw gRPC text.
func DialAPI(dir string) (*grpc.ClientConn, error) {
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

// SupervisorProblem returns an error wrapping errdefs.ErrUnavailable when the
// supervisor of a live VM in another process does not answer a status
// probe within ProbeTimeout, and nil when it answers or is not there.
func SupervisorProblem(ctx context.Context, rec *store.VM) error {
	pid := rec.SupervisorPID
	if !rec.Live() || pid == os.Getpid() || !ProcessAlive(pid) {
		return nil
	}
	if Stopped(pid) {
		return unresponsive(rec, "stopped: SIGSTOP or a debugger")
	}
	conn, err := DialAPI(rec.Dir)
	if err != nil {
		return nil
	}
	defer conn.Close()
	pctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	_, err = controlpb.NewControlClient(conn).Status(pctx, &controlpb.StatusRequest{})
	switch {
	case err == nil, ctx.Err() != nil:
		return nil
	case !ProcessAlive(pid):
		return nil // it just ended: the state row says how
	case Stopped(pid):
		return unresponsive(rec, "stopped: SIGSTOP or a debugger")
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, errdefs.ErrUnavailable):
		return unresponsive(rec, fmt.Sprintf("no answer within %s", ProbeTimeout))
	}
	return nil // it answered, with an error: it is alive
}

func unresponsive(rec *store.VM, why string) error {
	return fmt.Errorf("supervisor of VM %s is %w (pid %d, %s): 'smolvm rm -f %s' kills it", rec.Name, errdefs.ErrUnavailable, rec.SupervisorPID, why, rec.Name)
}

// maxProbes bounds the supervisors probed at once (a connection and a
// status call each): a host of hundreds of VMs is probed in waves.
const maxProbes = 16

// ProbeAll runs SupervisorProblem on the live VMs of recs, maxProbes at a
// time, and returns the problems by VM id.
func ProbeAll(ctx context.Context, recs []*store.VM) map[string]error {
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
			if err := SupervisorProblem(ctx, r); err != nil {
				mu.Lock()
				out[r.ID] = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// ProcState is the state letter of a process in /proc/PID/stat (R, S, T
// for stopped, Z…), or 0.
// Stopped says whether process pid is stopped (SIGSTOP) or traced.
func Stopped(pid int) bool {
	s := ProcState(pid)
	return s == 'T' || s == 't'
}

func ProcState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2]
	}
	return 0
}

// KillSupervisor ends a VM whose supervisor does not answer: SIGKILL to
// the supervisor (only if the pid is still this VM's supervisor, not a
// recycled one) and to its QEMU (which PR_SET_PDEATHSIG kills too), then
// what the supervisor's teardown would have removed (API socket, TAP and
// nftables rules), and records the VM as stopped.
func KillSupervisor(ctx context.Context, st *store.Store, rec *store.VM) error {
	if pid := rec.SupervisorPID; IsSupervisorOf(pid, rec.ID) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill supervisor of VM %s (pid %d): %w", rec.Name, pid, err)
		}
	}
	KillStrayHypervisor(rec.HypervisorPID, rec.ID, rec.Dir)
	deadline := time.Now().Add(10 * time.Second)
	for (IsSupervisorOf(rec.SupervisorPID, rec.ID) && ProcessAlive(rec.SupervisorPID)) ||
		(isHypervisorOf(rec.HypervisorPID, rec.ID) && ProcessAlive(rec.HypervisorPID)) {
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
	if err := ReleaseNetwork(ctx, st, rec.ID); err != nil {
		return err
	}
	_, err := st.UpdateVM(context.WithoutCancel(ctx), rec.ID, func(v *store.VM) error {
		v.State, v.Reason, v.HypervisorPID = store.StateStopped, "killed: its supervisor was not responding", 0
		return nil
	})
	return err
}

// Reconcile marks live-looking VMs whose supervisor is gone as failed.
func Reconcile(ctx context.Context, st *store.Store) ([]*store.VM, error) {
	recs, err := st.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for i, r := range recs {
		if !r.Live() || ProcessAlive(r.SupervisorPID) {
			continue
		}
		reason := "supervisor process exited unexpectedly"
		if r.State == store.StateCreating {
			reason = "creation was interrupted"
		}
		if u, err := st.UpdateVM(ctx, r.ID, func(v *store.VM) error {
			if v.Live() && !ProcessAlive(v.SupervisorPID) {
				v.State, v.Reason = store.StateFailed, reason
			}
			return nil
		}); err == nil {
			recs[i] = u
		}
	}
	return recs, nil
}

// KillStrayHypervisor kills pid only if it is this VM's QEMU, and the
// file system daemons of the VM in dir that outlived it.
func KillStrayHypervisor(pid int, id, dir string) {
	if isHypervisorOf(pid, id) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	// Only a VM with host folders has file system daemons (their sources
	// are dir/fsN): the others need no walk of every process.
	if _, err := os.Lstat(filepath.Join(dir, "fs0")); err == nil {
		killStrayFSDaemons(id)
	}
}

func isHypervisorOf(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), "smolvm-"+id)
}

// WaitSupervisor gives a detached supervisor that is finishing up a few
// seconds to exit, then kills it. Other processes are left alone.
func WaitSupervisor(ctx context.Context, pid int, id string) {
	if pid <= 0 || pid == os.Getpid() || !IsSupervisorOf(pid, id) {
		return
	}
	deadline := time.Now().Add(3 * time.Second)
	for ProcessAlive(pid) && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	if ProcessAlive(pid) && IsSupervisorOf(pid, id) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func IsSupervisorOf(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), SuperviseCommand+"\x00"+id)
}

// ProcessAlive tells whether a process with this pid exists.
func ProcessAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	if err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	// A zombie (exited, not yet reaped by its parent) is not alive.
	return ProcState(pid) != 'Z'
}

// ReleaseNetwork removes what a tap-mode VM's network may have left on the
// host when its supervisor could not (it was killed, or the VM failed):
// the TAP device and the VM's nftables rules. Its leases go with its row.
func ReleaseNetwork(ctx context.Context, st *store.Store, id string) error {
	rec, err := st.GetVM(ctx, id)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		return err
	}
	var spec supervisor.Spec
	if json.Unmarshal(rec.Config, &spec) != nil || spec.Network == nil || spec.Network.Mode != network.ModeTAP {
		return nil
	}
	what, err := network.RemoveTAP(ctx, spec.Network, id)
	if err != nil {
		return err
	}
	if what != "" {
		slog.Debug("removed what the VM's network left", "vm", id, "removed", what)
	}
	return nil
}

// killStrayFSDaemons kills the virtiofsd processes of VM id that outlived
// their QEMU and supervisor (they die with the supervisor's thread that
// started them; this is for what a crash left anyway). Each names its
// folder in the VM's state folder (source=…/vms/ID/fsN).
func killStrayFSDaemons(id string) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	mark := "source=" // then a path ending in /vms/ID/fsN
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != filepath.Base(qemu.Virtiofsd) {
			continue
		}
		for _, a := range args[1:] {
			src, ok := strings.CutPrefix(a, mark)
			if ok && filepath.Base(filepath.Dir(src)) == id && filepath.Base(filepath.Dir(filepath.Dir(src))) == "vms" {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}
