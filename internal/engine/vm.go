package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// NotRunning is the ErrNotRunning of a VM that is not running: its state,
// why, and the command that helps.
func NotRunning(rec *store.VM) error {
	msg := fmt.Sprintf("VM %s is %s", rec.Name, rec.State)
	if rec.Reason != "" && rec.Reason != "stopped" {
		msg += " (" + rec.Reason + ")"
	}
	switch rec.State {
	case store.StateFailed:
		return fmt.Errorf("%w: %s: remove it with 'smolvm rm %s'", errdefs.ErrNotRunning, msg, rec.Name)
	case store.StatePaused:
		return fmt.Errorf("%w: %s: resume it first with 'smolvm resume %s'", errdefs.ErrNotRunning, msg, rec.Name)
	}
	return fmt.Errorf("%w: %s: start it with 'smolvm start %s'", errdefs.ErrNotRunning, msg, rec.Name)
}

// Start boots stopped VM id again (a fresh boot) within the host's
// capacity. It returns the VM's supervisor when the VM lives in this
// process, nil for a persistent VM (its supervisor is spawned).
func (h *Host) Start(ctx context.Context, id string, within Within, log *slog.Logger) (*supervisor.Supervisor, error) {
	started := time.Now()
	st := h.Store
	rec, err := st.GetVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if rec.Live() && ProcessAlive(rec.SupervisorPID) {
		return nil, fmt.Errorf("%w: VM %s is already %s", errdefs.ErrExists, rec.Name, rec.State)
	}
	var spec supervisor.Spec
	if err := json.Unmarshal(rec.Config, &spec); err != nil {
		return nil, fmt.Errorf("read VM %s: %w", rec.Name, err)
	}
	if _, err := SupervisorBinary(spec.SupervisorBinary); spec.Persistent && err != nil {
		return nil, err
	}
	if err := within(ctx, func(c store.Capacity) error {
		_, err := st.UpdateVMWithin(ctx, id, c, func(v *store.VM) error {
			v.State, v.Reason, v.SupervisorPID = store.StateCreating, "", os.Getpid()
			if v.MemoryMiB == 0 { // made before the store recorded memory
				v.MemoryMiB = spec.Machine.MemoryMiB
			}
			return nil
		})
		return err
	}); err != nil {
		return nil, fmt.Errorf("start VM %s: %w", rec.Name, err)
	}
	if spec.Persistent {
		return nil, h.spawn(ctx, spec.SupervisorBinary, id, started, started, log)
	}
	return supervisor.Start(ctx, id, supervisor.Options{Store: st, Logger: log, Started: started})
}

// RemoveVM removes a stopped VM: its network leases, its disk (kept
// elsewhere with RetainDisk), its cgroup, its folder and its row.
func (h *Host) RemoveVM(ctx context.Context, id, dir string) error {
	if err := ReleaseNetwork(ctx, h.Store, id); err != nil {
		return err
	}
	if err := retainDisk(dir); err != nil {
		return err
	}
	if dir != "" {
		// A hypervisor's cgroup outlives it when its supervisor was
		// killed (the supervisor removes it otherwise); its uid is
		// freed now, not at some later VM's start.
		if err := jail.ReleaseFolder(dir); err != nil {
			return fmt.Errorf("release the cgroup and uid of VM %s: %w", id, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove state folder of VM %s: %w", id, err)
		}
	}
	if err := h.Store.DeleteVM(ctx, id); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return nil
}

// Cleanup removes VMs whose processes died (all with all; kill stops a
// live one first), state folders no VM owns, snapshots whose making was
// interrupted, spares of processes that are gone and leftover probes. It
// returns what it removed.
func (h *Host) Cleanup(ctx context.Context, all bool, kill func(ctx context.Context, id string)) ([]string, error) {
	st := h.Store
	recs, err := Reconcile(ctx, st)
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	known := map[string]bool{}
	for _, r := range recs {
		known[r.ID] = true
		if r.State != store.StateFailed && !all {
			continue
		}
		if r.Live() {
			kill(ctx, r.ID)
		}
		KillStrayHypervisor(r.HypervisorPID, r.ID, r.Dir)
		WaitSupervisor(ctx, r.SupervisorPID, r.ID)
		if err := h.RemoveVM(ctx, r.ID, r.Dir); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, r.ID)
	}
	// State folders without a VM row (a crash between steps).
	entries, _ := os.ReadDir(filepath.Join(h.Home, "vms"))
	for _, e := range entries {
		if !known[e.Name()] {
			dir := filepath.Join(h.Home, "vms", e.Name())
			if err := errors.Join(jail.ReleaseFolder(dir), os.RemoveAll(dir)); err != nil {
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
	for _, name := range supervisor.RemoveAbandonedSpares(SparesDir(h.Home)) {
		removed = append(removed, "spare "+name)
	}
	probes, _ := filepath.Glob(filepath.Join(h.Home, "probe-*"))
	for _, p := range probes {
		_ = jail.ReleaseFolder(p)
		_ = os.RemoveAll(p)
	}
	return removed, errors.Join(errs...)
}

// Machine is what a VM's records say of its machine.
type Machine struct {
	VCPUs, MemoryMiB        int
	Persistent, Prelaunched bool
	Accel, Channel          string
	// Hypervisor is the driver and its version, e.g. "qemu 8.2.2" (empty
	// until the VM first ran).
	Hypervisor string
}

// MachineOf reads a VM's machine from its record; what it cannot read
// stays zero.
func MachineOf(rec *store.VM) Machine {
	var m Machine
	var spec supervisor.Spec
	if json.Unmarshal(rec.Config, &spec) == nil {
		m.VCPUs, m.MemoryMiB, m.Persistent = spec.Machine.VCPUs, spec.Machine.MemoryMiB, spec.Persistent
		m.Prelaunched = spec.Prelaunched
		m.Accel, m.Channel = string(spec.Machine.Accel), string(spec.Machine.Channel)
	}
	var mi hypervisor.Info
	if json.Unmarshal(rec.Info, &mi) == nil && mi.Driver != "" {
		m.Hypervisor = strings.TrimSpace(mi.Driver + " " + mi.Version)
	}
	return m
}

// NetworkOf reads a VM's network from its record.
func NetworkOf(rec *store.VM) (*network.Config, error) {
	var spec supervisor.Spec
	if err := json.Unmarshal(rec.Config, &spec); err != nil {
		return nil, fmt.Errorf("read VM %s: %w", rec.Name, err)
	}
	return spec.Network, nil
}

// CheckDriver returns the hypervisor driver name names ("" is the
// default), or ErrInvalid naming the drivers there are.
func CheckDriver(name string) (string, error) {
	if name == "" {
		name = hypervisor.Default
	}
	if _, err := hypervisor.Get(name); err != nil {
		return "", err
	}
	return name, nil
}

// MinConsoleLog is the least a VM's console log may be bounded to.
const MinConsoleLog = consolelog.MinMaxBytes

// Logs writes the guest console of the VM in dir, or with supervisorLog
// its supervisor's log, to w; with running set it follows the log while
// running says the VM is up, until ctx ends.
func Logs(ctx context.Context, w io.Writer, dir, name string, supervisorLog bool, running func() bool) error {
	file := supervisor.ConsoleLog
	if supervisorLog {
		file = supervisor.LogFile
	}
	path := filepath.Join(dir, file)
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("read logs of VM %s: %w", name, err)
	}
	if running == nil {
		return consolelog.Copy(w, path)
	}
	return consolelog.Follow(ctx, w, path, 200*time.Millisecond, running)
}
