package smolvm

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// SnapshotInfo describes a saved VM.
type SnapshotInfo struct {
	Name     string    `json:"name"`
	Dir      string    `json:"dir"`
	SourceVM string    `json:"source_vm"`
	Created  time.Time `json:"created"`
	// MemoryBytes is what the saved memory and device state take on the
	// host: the migration stream, and the memory file if the snapshot has
	// one (its allocated blocks: free guest memory is a hole).
	MemoryBytes int64 `json:"memory_bytes"`
	// DiskBytes is what the snapshot's frozen disks take on the host: the
	// VM's changes to its image, not the image.
	DiskBytes int64  `json:"disk_bytes,omitempty"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	Image     string `json:"image"`
	Warm      bool   `json:"warm,omitempty"`
	// State is "" for a snapshot that is complete, SnapshotCreating while
	// it is being made and SnapshotInterrupted when the process making it
	// died first (it does not restore; cleanup removes it).
	State string `json:"state,omitempty"`
}

// States of a snapshot that is not complete (SnapshotInfo.State).
const (
	SnapshotCreating    = "creating"
	SnapshotInterrupted = "interrupted"
)

var snapNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

// Snapshot saves the VM's memory, device state and settings under name,
// and its disk when it was booted from a disk image: in isolated mode a
// copy of its overlay (only what the VM changed on top of the image), in
// shared mode the read-only image by reference. The VM pauses while it is
// written and then goes on; commands running across a snapshot lose their
// connection. Any number of VMs can be restored from one snapshot at once,
// each on a disk overlay of its own.
func (vm *VM) Snapshot(ctx context.Context, name string) (*SnapshotInfo, error) {
	if !snapNameRE.MatchString(name) || strings.HasPrefix(name, engine.WarmPrefix) {
		return nil, fmt.Errorf("%w: snapshot name %q: use 1-63 letters, digits, '_', '.', '-' (not starting with %q)", ErrInvalid, name, engine.WarmPrefix)
	}
	return vm.snapshot(ctx, name, false)
}

// snapshot saves the VM as name; warm is for the warm snapshot, whose VM
// nothing else calls meanwhile (see supervisor.SnapshotOptions.KeepLane).
func (vm *VM) snapshot(ctx context.Context, name string, warm bool) (*SnapshotInfo, error) {
	vm.mu.Lock()
	sup, control := vm.sup, vm.control
	vm.mu.Unlock()
	in, err := vm.host.eng.TakeSnapshot(ctx, vm.id, name, func(dir string, rec *store.VM) error {
		switch {
		case sup != nil:
			return sup.Snapshot(ctx, dir, supervisor.SnapshotOptions{Resume: true, KeepLane: warm})
		case control != nil:
			if _, err := control.Snapshot(ctx, &controlpb.SnapshotRequest{Dir: dir, Resume: true}); err != nil {
				return vm.apiErr(ctx, "", err)
			}
			return nil
		}
		return notRunning(rec)
	})
	return (*SnapshotInfo)(in), err
}

// Restore starts a new VM from a snapshot. Only the name, persistence,
// state folder, logger and timeouts of cfg apply: the machine's shape is
// the snapshot's (a MemoryMiB or VCPUs set to something else is
// ErrInvalid). The clone is a distinct machine: fresh entropy, the
// host's wall clock, its own hostname and machine id. A clone of a VM
// booted from a disk image writes to an overlay of its own on the
// snapshot's disk; started again after a stop, it boots from that disk.
//
// Restore opens a Host of cfg.Home for the VM (closed with it).
func Restore(ctx context.Context, snapshot string, cfg Config) (*VM, error) {
	valid := cfg // a config that is refused makes no state folder
	if err := valid.setDefaults(); err != nil {
		return nil, err
	}
	h, err := OpenHost(cfg.Home)
	if err != nil {
		return nil, err
	}
	return h.handOver(restore(ctx, h, snapshot, cfg))
}

func restore(ctx context.Context, h *Host, snapshot string, cfg Config) (*VM, error) {
	started := time.Now()
	mem, cpus := cfg.MemoryMiB, cfg.VCPUs // the shape asked for, before defaults
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if len(cfg.Mounts) > 0 {
		return nil, engine.ErrMountsNoSnapshot
	}
	ec := cfg.engineConfig(h.home)
	ec.MemoryMiB, ec.VCPUs = mem, cpus
	var vm *VM
	if err := h.eng.Restore(ctx, snapshot, ec, started, h.attach(&vm, cfg.Logger)); err != nil {
		return nil, err
	}
	return vm, nil
}

// ensureWarm makes the warm snapshot of the default VM shape, unless it is
// there and restores. It starts a VM of that shape as New would: a restore
// of the warm snapshot when there is a current one (a fraction of a second:
// setup run again stays quick), else a cold boot, which it primes, saves and
// deletes. Warm snapshots of other images or shapes are removed.
func ensureWarm(ctx context.Context, h *Host, cfg Config) error {
	cfg.Cold, cfg.Persistent, cfg.Name = false, false, ""
	// Zeroing freed pages makes most of guest memory zero pages, which
	// the snapshot skips (110 → 71 MB). Only the warm boot pays for it:
	// it touches all guest memory, which VMs that boot cold should not.
	cfg.BootArgs = strings.TrimSpace(cfg.BootArgs + " " + engine.WarmBootArgs)
	// Its memory is a file, which becomes the snapshot's memory as it is:
	// clones map it copy-on-write instead of loading a migration stream
	// of all of it (see hypervisor.MachineConfig.MemoryFile).
	cfg.fileMemory = true
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Logger = engine.Quiet(cfg.Logger, slog.LevelError)
	vm, err := h.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("warm snapshot: boot: %w", err)
	}
	defer vm.Close()
	name, err := h.eng.WarmName(ctx, vm.id)
	if err != nil || name == "" {
		return err // "": restored, so this shape's warm snapshot is current
	}
	// A clone's first calls are a refresh and, mostly, a command: make
	// both once so that what the guest builds for them on first use is in
	// the snapshot.
	if err := vm.sup.Prime(ctx); err != nil {
		return fmt.Errorf("warm snapshot: prime: %w", err)
	}
	if _, err := vm.Run(ctx, "true"); err != nil {
		return fmt.Errorf("warm snapshot: prime: %w", err)
	}
	if _, err := vm.snapshot(ctx, name, true); err != nil {
		return fmt.Errorf("warm snapshot: %w", err)
	}
	h.eng.DropOtherWarm(ctx, name)
	return nil
}

// Pause freezes the VM's vCPUs; its memory stays. Commands in it stall
// until Resume.
func (vm *VM) Pause(ctx context.Context) error { return vm.setPaused(ctx, true) }

// Resume lets a paused VM run again.
func (vm *VM) Resume(ctx context.Context) error { return vm.setPaused(ctx, false) }

func (vm *VM) setPaused(ctx context.Context, pause bool) error {
	vm.mu.Lock()
	control := vm.control
	vm.mu.Unlock()
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return err
	}
	if control == nil || !rec.Live() {
		return notRunning(rec)
	}
	// The supervisor records the state.
	if pause {
		_, err = control.Pause(ctx, &controlpb.PauseRequest{})
	} else {
		_, err = control.Resume(ctx, &controlpb.ResumeRequest{})
	}
	if err != nil {
		return vm.apiErr(ctx, "VM "+vm.name, err)
	}
	return nil
}
