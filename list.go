package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// List describes every VM in the default state folder (Host.List for
// another folder). A VM whose supervisor died is reported (and recorded)
// as failed with the reason; one whose supervisor lives but does not
// answer within a couple of seconds is reported as StateUnresponsive (not
// recorded).
func List(ctx context.Context) ([]*Info, error) {
	h, err := OpenHost("")
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.List(ctx)
}

func list(ctx context.Context, st *store.Store) ([]*Info, error) {
	recs, err := engine.Reconcile(ctx, st)
	if err != nil {
		return nil, err
	}
	problems := engine.ProbeAll(ctx, recs) // internal/engine
	out := make([]*Info, 0, len(recs))
	for _, r := range recs {
		in := infoOf(r)
		markUnresponsive(in, problems[r.ID])
		out = append(out, in)
	}
	return out, nil
}

// CleanupOptions tune Cleanup.
type CleanupOptions struct {
	// Home is the state folder ("" = Home()); Host.Cleanup takes its own.
	Home string
	// All removes every VM, running ones included.
	All bool
}

// Cleanup removes VMs whose processes died (state, sockets, disks, leases,
// a leftover hypervisor process), state folders no VM owns and snapshots
// whose making was interrupted. With All it
// removes every VM. It returns the ids it removed.
func Cleanup(ctx context.Context, opts CleanupOptions) ([]string, error) {
	h, err := OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.Cleanup(ctx, opts)
}

func cleanup(ctx context.Context, h *Host, opts CleanupOptions) ([]string, error) {
	st := h.st
	recs, err := engine.Reconcile(ctx, st)
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
			vm, err := open(ctx, h, r.ID, nil)
			if err == nil {
				_ = vm.stop(ctx, true)
			}
		}
		engine.KillStrayHypervisor(r.HypervisorPID, r.ID, r.Dir)
		engine.WaitSupervisor(ctx, r.SupervisorPID, r.ID)
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
	for _, name := range supervisor.RemoveAbandonedSpares(engine.SparesDir(homeOf(st))) {
		removed = append(removed, "spare "+name)
	}
	probes, _ := filepath.Glob(filepath.Join(homeOf(st), "probe-*"))
	for _, p := range probes {
		_ = jail.RemoveRecordedCgroup(p)
		_ = os.RemoveAll(p)
	}
	return removed, errors.Join(errs...)
}
