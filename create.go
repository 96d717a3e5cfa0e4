package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// New creates a VM, boots it and returns once its agent answers. Unless
// cfg.Persistent, the VM lives in this process: Close stops and deletes it.
// A failed create leaves nothing behind.
//
// New opens a Host of cfg.Home for the VM (closed with it); a program
// that makes many VMs opens one Host and calls its New.
func New(ctx context.Context, cfg Config) (*VM, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	h, err := OpenHost(cfg.Home)
	if err != nil {
		return nil, err
	}
	return h.handOver(newVM(ctx, h, cfg))
}

func newVM(ctx context.Context, h *Host, cfg Config) (*VM, error) {
	started := time.Now()
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	vm, err := create(ctx, h, &cfg, started, nil)
	var we warmError
	// A supervisor that died (killed, say) is no fault of the snapshot:
	// the create fails, and says so.
	if errors.Is(err, engine.ErrSupervisorDied) {
		return nil, err
	}
	if errors.As(err, &we) && we.prelaunched && ctx.Err() == nil {
		// The QEMU started ahead of time failed (it died, say): restore
		// into a QEMU of this VM's own.
		cfg.Logger.Debug("restore into the prelaunched hypervisor failed; restoring into a new one", "err", we.error)
		cfg.Prelaunch = false
		vm, err = create(ctx, h, &cfg, started, nil)
	}
	if errors.As(err, &we) && ctx.Err() == nil {
		// A warm snapshot that no longer restores (say, a QEMU upgrade
		// changed the machine) must not stop anyone: boot instead.
		cfg.Logger.Warn(fmt.Sprintf("the warm snapshot did not restore; booting instead (remake it: smolvm snapshot rm %s && smolvm setup)", we.snapshot), "err", we.error)
		cfg.Cold = true
		vm, err = create(ctx, h, &cfg, started, nil)
	}
	if err != nil {
		return nil, err
	}
	return vm, nil
}

// warmError is a failure to start a VM from the warm snapshot of its shape.
type warmError struct {
	error
	snapshot    string
	prelaunched bool // the restore was into a prelaunched hypervisor
}

func (e warmError) Unwrap() error { return e.error }

// create allocates a VM and starts it: a cold boot, or a restore of snap
// when it is set (or of the warm snapshot matching the VM's shape).
func create(ctx context.Context, h *Host, cfg *Config, started time.Time, snap *snapshotSource) (_ *VM, err error) {
	st := h.st
	// A full state folder fails with an error that names it: what was
	// made is undone, and the database and other VMs stay as they were.
	defer func() { err = noSpace(homeOf(st), err, stateFix) }()
	log := cfg.Logger
	log.Debug("phase create: allocating state", "name", cfg.Name)
	var img *resolvedImage
	if snap != nil {
		img = snap.image
	} else if img, err = resolveImage(ctx, homeOf(st), cfg); err != nil {
		return nil, err
	} else if err = useNamedImage(ctx, st, cfg, img); err != nil {
		return nil, err
	}
	rec := &store.VM{Name: cfg.Name, State: store.StateCreating, Ephemeral: !cfg.Persistent, Image: img.name, SupervisorPID: os.Getpid(), MemoryMiB: cfg.MemoryMiB}
	if snap != nil {
		rec.Snapshot, rec.MemoryMiB = snap.name, snap.spec.Machine.MemoryMiB
	}
	if err := checkStateSpace(homeOf(st)); err != nil {
		return nil, err
	}
	if err := createWithin(ctx, st, cfg, rec); err != nil {
		return nil, err
	}
	dir := filepath.Join(homeOf(st), "vms", rec.ID)
	undo := func(cause error) error {
		_ = os.RemoveAll(dir)
		return errors.Join(cause, st.DeleteVM(context.WithoutCancel(ctx), rec.ID))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, undo(fmt.Errorf("create state folder: %w", err))
	}
	var spec *supervisor.Spec
	var spare *supervisor.Spare // a prelaunched hypervisor, until the supervisor has it
	defer func() {
		if spare != nil {
			spare.Discard()
		}
	}()
	if snap != nil {
		spec, err = restoreSpec(ctx, st, cfg, snap, rec, dir)
	} else {
		spec, err = buildSpec(ctx, st, cfg, img, rec, dir)
		// A VM with host folders boots: a snapshot has no virtiofs device.
		if err == nil && !cfg.Cold && len(cfg.Mounts) > 0 {
			log.Debug("booting: a VM with host folders cannot be restored from the warm snapshot")
		} else if err == nil && !cfg.Cold {
			if warm := findWarm(ctx, st, spec); warm == nil {
				warnStaleWarm(ctx, st, spec, log)
			} else {
				log.Debug("restoring the warm snapshot of this VM shape", "snapshot", warm.Name)
				rec.Snapshot = warm.Name
				spec.Restored = true
				restoreFrom(&spec.Machine, warm.Dir) // findWarm checked its memory file
				if cfg.Prelaunch && !cfg.Persistent {
					spare = engine.TakeSpare(homeOf(st), warm.Name)
				}
			}
		}
	}
	if err != nil {
		return nil, undo(err)
	}
	if spare != nil {
		// Its folder becomes the VM's; its machine is the one built for
		// this shape (same devices, sockets now in dir).
		if mc, err := spare.Claim(dir, rec.ID, cfg.ConsoleLogMaxBytes); err != nil {
			log.Debug("prelaunched hypervisor not usable; starting one", "err", err)
			spare.Discard()
			spare = nil
		} else {
			spec.Machine.Net, spec.Prelaunched = mc.Net, true
		}
	}
	if snap == nil && spec.Restored {
		// Failures from here on are the warm snapshot's: New boots instead.
		inner := undo
		undo = func(cause error) error { return warmError{inner(cause), rec.Snapshot, spec.Prelaunched} }
	}
	sj, _ := json.Marshal(spec)
	if _, err := st.UpdateVM(ctx, rec.ID, func(v *store.VM) error {
		v.Dir, v.Config, v.Snapshot = dir, sj, rec.Snapshot
		return nil
	}); err != nil {
		return nil, undo(err)
	}
	createDone := time.Now()
	log.Debug("phase create done", "vm", rec.ID, "took", createDone.Sub(started))
	if cfg.Persistent {
		if err := cfg.spawnSupervisor(ctx, homeOf(st), rec.ID, started, createDone); err != nil {
			return nil, undo(err)
		}
		vm, err := open(ctx, h, rec.ID, cfg.Logger)
		if err != nil {
			return nil, undo(err)
		}
		return vm, nil
	}
	sup, err := supervisor.Start(ctx, rec.ID, supervisor.Options{Store: st, Logger: log, Started: started, CreateDone: createDone, Spare: spare})
	spare = nil // the supervisor's now, or ended with it
	if err != nil {
		return nil, undo(err)
	}
	if cfg.Prelaunch && snap == nil && spec.Restored {
		engine.Prelaunch(homeOf(st), rec.Snapshot, spec.Driver, spec.Machine, log)
	}
	vm, err := open(ctx, h, rec.ID, cfg.Logger)
	if err != nil {
		_ = sup.Stop(context.WithoutCancel(ctx), true, 0)
		return nil, undo(err)
	}
	vm.sup, vm.owned = sup, true
	vm.agent = sup.Agent()
	return vm, nil
}

// buildSpec turns the user's config into what the supervisor runs.
func buildSpec(ctx context.Context, st *store.Store, cfg *Config, img *resolvedImage, rec *store.VM, dir string) (*supervisor.Spec, error) {
	accel, err := engine.ResolveAccel(ctx, homeOf(st), cfg.Hypervisor, cfg.Accel, img.kernel, img.initrd, cfg.Logger)
	if err != nil {
		return nil, err
	}
	channel, err := engine.ResolveChannel(cfg.Channel)
	if err != nil {
		return nil, err
	}
	mc := hypervisor.MachineConfig{
		ID: rec.ID, Dir: dir, Kernel: img.kernel, Initrd: img.initrd,
		Cmdline: engine.GuestCmdline(rec.Name, accel, cfg.BootArgs, img.tuned), VCPUs: cfg.VCPUs, MemoryMiB: cfg.MemoryMiB,
		Accel: accel, Channel: channel, ConsoleLog: filepath.Join(dir, supervisor.ConsoleLog),
		ConsoleLogMaxBytes: cfg.ConsoleLogMaxBytes,
	}
	if len(cfg.Mounts) > 0 { // mounts.go
		mc.Mounts, mc.Cmdline = machineMounts(cfg.Mounts), mc.Cmdline+" "+mountArgs(cfg.Mounts)
	}
	if cfg.fileMemory {
		mc.MemoryFile = filepath.Join(dir, supervisor.MemoryFile)
	}
	if err := attachDisks(ctx, st, cfg, rec, &mc); err != nil {
		return nil, err
	}
	if channel == hypervisor.ChannelVsock {
		cid, err := st.Allocate(ctx, "vsock-cid", rec.ID, 3, 1<<31)
		if err != nil {
			return nil, fmt.Errorf("allocate vsock cid: %w", err)
		}
		mc.CID = uint32(cid)
	}
	netCfg, err := buildNetwork(ctx, st, cfg, rec, &mc) // network.go
	if err != nil {
		return nil, err
	}
	return &supervisor.Spec{Driver: cfg.Hypervisor, Machine: mc, BootTimeout: cfg.BootTimeout, Hostname: rec.Name,
		Persistent: cfg.Persistent, SupervisorBinary: cfg.SupervisorBinary, ImageFingerprint: img.fingerprint,
		MachineLayout: hypervisor.MachineLayout,
		Network:       netCfg}, nil
}

func diskFormat(path string) string {
	if strings.HasSuffix(path, ".qcow2") {
		return "qcow2"
	}
	return "raw"
}

// spawnSupervisor starts the detached supervisor of VM id (see
// engine.SpawnSupervisor) with the smolvm binary cfg names or finds.
func (c *Config) spawnSupervisor(ctx context.Context, home, id string, started, createDone time.Time) error {
	bin, err := engine.SupervisorBinary(c.SupervisorBinary)
	if err != nil {
		return err
	}
	return engine.SpawnSupervisor(ctx, bin, home, id, started, createDone, c.Logger)
}
