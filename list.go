package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// List describes every VM in the default state folder. A VM whose
// supervisor died is reported (and recorded) as failed with the reason;
// one whose supervisor lives but does not answer within a couple of
// seconds is reported as StateUnresponsive (not recorded).
func List(ctx context.Context) ([]*Info, error) { return ListIn(ctx, "") }

// ListIn is List with an explicit state folder.
func ListIn(ctx context.Context, home string) ([]*Info, error) {
	st, err := openStore(ctx, home)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	recs, err := reconcile(ctx, st)
	if err != nil {
		return nil, err
	}
	problems := probeAll(ctx, recs) // health.go
	out := make([]*Info, 0, len(recs))
	for _, r := range recs {
		in := infoOf(r)
		markUnresponsive(in, problems[r.ID])
		out = append(out, in)
	}
	return out, nil
}

// reconcile marks live-looking VMs whose supervisor is gone as failed.
func reconcile(ctx context.Context, st *store.Store) ([]*store.VM, error) {
	recs, err := st.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for i, r := range recs {
		if !r.Live() || processAlive(r.SupervisorPID) {
			continue
		}
		reason := "supervisor process exited unexpectedly"
		if r.State == store.StateCreating {
			reason = "creation was interrupted"
		}
		if u, err := st.UpdateVM(ctx, r.ID, func(v *store.VM) error {
			if v.Live() && !processAlive(v.SupervisorPID) {
				v.State, v.Reason = store.StateFailed, reason
			}
			return nil
		}); err == nil {
			recs[i] = u
		}
	}
	return recs, nil
}

// CleanupOptions tune Cleanup.
type CleanupOptions struct {
	Home string
	// All removes every VM, running ones included.
	All bool
}

// Cleanup removes VMs whose processes died (state, sockets, disks, leases,
// a leftover hypervisor process), state folders no VM owns and snapshots
// whose making was interrupted. With All it
// removes every VM. It returns the ids it removed.
func Cleanup(ctx context.Context, opts CleanupOptions) ([]string, error) {
	st, err := openStore(ctx, opts.Home)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	recs, err := reconcile(ctx, st)
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	known := map[string]bool{}
	for _, r := range recs {
		known[r.ID] = true
		if r.State != store.StateFailed && !opts.All {
			continue
		}
		if r.Live() {
			vm, err := open(ctx, st, r.ID, nil)
			if err == nil {
				_ = vm.stop(ctx, true)
			}
		}
		killStrayHypervisor(r.HypervisorPID, r.ID)
		waitSupervisor(ctx, r.SupervisorPID, r.ID)
		if err := removeVM(ctx, st, r.ID, r.Dir); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, r.ID)
	}
	// State folders without a VM row (a crash between steps).
	entries, _ := os.ReadDir(filepath.Join(homeOf(st), "vms"))
	for _, e := range entries {
		if !known[e.Name()] {
			dir := filepath.Join(homeOf(st), "vms", e.Name())
			if err := errors.Join(jail.RemoveRecordedCgroup(dir), os.RemoveAll(dir)); err != nil {
				errs = append(errs, err)
			} else {
				removed = append(removed, e.Name())
			}
		}
	}
	// Snapshots whose making was interrupted (the process died).
	sns, err := st.ListSnapshots(ctx)
	if err != nil {
		errs = append(errs, err)
	}
	for _, sn := range sns {
		if snapshotState(sn.Dir) != SnapshotInterrupted {
			continue
		}
		if err := st.DeleteSnapshot(ctx, sn.Name); err != nil {
			errs = append(errs, err)
		} else if err := os.RemoveAll(sn.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove snapshot folder: %w", err))
		} else {
			removed = append(removed, "snapshot "+sn.Name)
		}
	}
	// Prelaunched hypervisors of processes that are gone.
	for _, name := range supervisor.RemoveAbandonedSpares(sparesDir(homeOf(st))) {
		removed = append(removed, "spare "+name)
	}
	probes, _ := filepath.Glob(filepath.Join(homeOf(st), "probe-*"))
	for _, p := range probes {
		_ = jail.RemoveRecordedCgroup(p)
		_ = os.RemoveAll(p)
	}
	return removed, errors.Join(errs...)
}

// killStrayHypervisor kills pid only if it is this VM's QEMU.
func killStrayHypervisor(pid int, id string) {
	if isHypervisorOf(pid, id) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	killStrayFSDaemons(id) // mounts.go
}

func isHypervisorOf(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), "smolvm-"+id)
}

// waitSupervisor gives a detached supervisor that is finishing up a few
// seconds to exit, then kills it. Other processes are left alone.
func waitSupervisor(ctx context.Context, pid int, id string) {
	if pid <= 0 || pid == os.Getpid() || !isSupervisorOf(pid, id) {
		return
	}
	deadline := time.Now().Add(3 * time.Second)
	for processAlive(pid) && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	if processAlive(pid) && isSupervisorOf(pid, id) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func isSupervisorOf(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), "__supervise\x00"+id)
}
