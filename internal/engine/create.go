package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// Within runs write, which records a VM as holding host resources, with
// the host's capacity limits (VMConfig.Within).
type Within func(ctx context.Context, write func(store.Capacity) error) error

// VMConfig is a VM to create: smolvm.Config checked, with its defaults
// set and its public types turned into the engine's (the smolvm package
// documents each field).
type VMConfig struct {
	Name                               string
	VCPUs, MemoryMiB                   int
	KernelPath, InitrdPath, RootfsPath string
	Image, DiskMode                    string
	DiskSizeMiB                        int
	RetainDisk                         bool
	ConsoleLogMaxBytes                 int64
	BootArgs, Accel, Channel           string
	Hypervisor                         string
	BootTimeout                        time.Duration
	Persistent                         bool
	SupervisorBinary                   string
	Cold                               bool
	Network, TAPSubnet                 string
	Ports                              []string
	Egress                             network.Egress
	Hosts                              map[string][]string
	Mounts                             []Mount
	Logger                             *slog.Logger
	Prelaunch                          bool
	// Within records the VM within the host's capacity: it runs write,
	// the transaction that makes the VM hold host resources, with the
	// limits that apply (and whatever lock makes the count and the write
	// one step across the host).
	Within Within
	// SpareRoom, with Prelaunch, counts the spare it starts against the
	// host's capacity (nil: not counted).
	SpareRoom SpareRoom
	// GiveWay, when set, runs once the VM has claimed a spare or not,
	// before it starts a hypervisor of its own: the host's spares that
	// its VMs leave no room for are reclaimed (Within leaves them, so that
	// the VM can still claim one).
	GiveWay func(ctx context.Context) error
	// FileMemory backs guest RAM with a shared file in the VM's folder
	// (the warm snapshot's VM).
	FileMemory bool
}

// Attach makes the caller's handle on a VM the engine has started: sup is
// its supervisor when it lives in this process (nil for a persistent VM).
// When Attach fails the VM is undone.
type Attach func(ctx context.Context, id string, sup *supervisor.Supervisor) error

// New creates a VM and starts it (see smolvm.New): a restore of the warm
// snapshot of its shape when there is one (a failed restore boots it
// instead), else a cold boot. started is when the caller began.
func (h *Host) New(ctx context.Context, cfg VMConfig, started time.Time, attach Attach) error {
	err := h.create(ctx, &cfg, started, nil, attach)
	var we warmError
	// A supervisor that died (killed, say) is no fault of the snapshot:
	// the create fails, and says so.
	if errors.Is(err, ErrSupervisorDied) {
		return err
	}
	if errors.As(err, &we) && we.prelaunched && ctx.Err() == nil {
		// The QEMU started ahead of time failed (it died, say): restore
		// into a QEMU of this VM's own.
		cfg.Logger.Debug("restore into the prelaunched hypervisor failed; restoring into a new one", "err", we.error)
		cfg.Prelaunch = false
		err = h.create(ctx, &cfg, started, nil, attach)
	}
	if errors.As(err, &we) && ctx.Err() == nil {
		// A warm snapshot that no longer restores (say, a QEMU upgrade
		// changed the machine) must not stop anyone: boot instead.
		cfg.Logger.Warn(fmt.Sprintf("the warm snapshot did not restore; booting instead (remake it: smolvm snapshot rm %s && smolvm setup)", we.snapshot), "err", we.error)
		cfg.Cold = true
		err = h.create(ctx, &cfg, started, nil, attach)
	}
	return err
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
func (h *Host) create(ctx context.Context, cfg *VMConfig, started time.Time, snap *snapshotSource, attach Attach) (err error) {
	st := h.Store
	// A full state folder fails with an error that names it: what was
	// made is undone, and the database and other VMs stay as they were.
	defer func() { err = NoSpace(h.Home, err, StateFix) }()
	log := cfg.Logger
	log.Debug("phase create: allocating state", "name", cfg.Name)
	var img *resolvedImage
	if snap != nil {
		img = snap.image
	} else if img, err = h.resolveImage(ctx, cfg); err != nil {
		return err
	} else if err = h.useNamedImage(ctx, cfg, img); err != nil {
		return err
	}
	rec := &store.VM{Name: cfg.Name, State: store.StateCreating, Ephemeral: !cfg.Persistent, Image: img.name, SupervisorPID: os.Getpid(), MemoryMiB: cfg.MemoryMiB}
	if snap != nil {
		rec.Snapshot, rec.MemoryMiB = snap.name, snap.spec.Machine.MemoryMiB
	}
	if err := CheckStateSpace(h.Home); err != nil {
		return err
	}
	if err := cfg.Within(ctx, func(c store.Capacity) error { return st.CreateVMWithin(ctx, rec, c) }); err != nil {
		return err
	}
	dir := filepath.Join(h.Home, "vms", rec.ID)
	undo := func(cause error) error {
		_ = jail.ReleaseID(dir)
		_ = os.RemoveAll(dir)
		return errors.Join(cause, st.DeleteVM(context.WithoutCancel(ctx), rec.ID))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return undo(fmt.Errorf("create state folder: %w", err))
	}
	var spec *supervisor.Spec
	var spare *supervisor.Spare // a prelaunched hypervisor, until the supervisor has it
	defer func() {
		if spare != nil {
			spare.Discard()
		}
	}()
	if snap != nil {
		spec, err = h.restoreSpec(ctx, cfg, snap, rec, dir)
	} else {
		spec, err = h.buildSpec(ctx, cfg, img, rec, dir)
		// A VM with host folders boots: a snapshot has no virtiofs device.
		if err == nil && !cfg.Cold && len(cfg.Mounts) > 0 {
			log.Debug("booting: a VM with host folders cannot be restored from the warm snapshot")
		} else if err == nil && !cfg.Cold {
			if warm := h.findWarm(ctx, spec); warm == nil {
				h.warnStaleWarm(ctx, spec, log)
			} else {
				log.Debug("restoring the warm snapshot of this VM shape", "snapshot", warm.Name)
				rec.Snapshot = warm.Name
				spec.Restored = true
				restoreFrom(&spec.Machine, warm.Dir) // findWarm checked its memory file
				if cfg.Prelaunch && !cfg.Persistent {
					spare = TakeSpare(h.Home, warm.Name)
				}
			}
		}
	}
	if err != nil {
		return undo(err)
	}
	if spare != nil {
		// Its folder becomes the VM's; its machine is the one built for
		// this shape (same devices, sockets now in dir).
		if mc, err := spare.Claim(dir, rec.ID, cfg.ConsoleLogMaxBytes); err != nil {
			log.Debug("prelaunched hypervisor not usable; starting one", "err", err)
			spare.Discard()
			spare = nil
		} else {
			// The VM's row counts it now (see hostcap.Spare).
			_ = os.Remove(filepath.Join(dir, hostcap.SpareFile))
			spec.Machine.Net, spec.Prelaunched = mc.Net, true
		}
	}
	if cfg.GiveWay != nil {
		if err := cfg.GiveWay(ctx); err != nil {
			log.Warn("prelaunched hypervisors could not give way to a new VM: the host may hold more than its capacity until they are used or ended", "err", err)
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
		return undo(err)
	}
	createDone := time.Now()
	log.Debug("phase create done", "vm", rec.ID, "took", createDone.Sub(started))
	if cfg.Persistent {
		if err := h.spawn(ctx, cfg.SupervisorBinary, rec.ID, started, createDone, log); err != nil {
			return undo(err)
		}
		if err := attach(ctx, rec.ID, nil); err != nil {
			return undo(err)
		}
		return nil
	}
	sup, err := supervisor.Start(ctx, rec.ID, supervisor.Options{Store: st, Logger: log, Started: started, CreateDone: createDone, Spare: spare})
	spare = nil // the supervisor's now, or ended with it
	if err != nil {
		return undo(err)
	}
	if cfg.Prelaunch && snap == nil && spec.Restored {
		Prelaunch(h.Home, rec.Snapshot, spec.Driver, spec.Machine, cfg.SpareRoom, log)
	}
	if err := attach(ctx, rec.ID, sup); err != nil {
		_ = sup.Stop(context.WithoutCancel(ctx), true, 0)
		return undo(err)
	}
	return nil
}

// buildSpec turns the user's config into what the supervisor runs.
func (h *Host) buildSpec(ctx context.Context, cfg *VMConfig, img *resolvedImage, rec *store.VM, dir string) (*supervisor.Spec, error) {
	accel, err := ResolveAccel(ctx, h.Home, cfg.Hypervisor, cfg.Accel, img.kernel, img.initrd, cfg.Logger)
	if err != nil {
		return nil, err
	}
	channel, err := ResolveChannel(cfg.Channel)
	if err != nil {
		return nil, err
	}
	mc := hypervisor.MachineConfig{
		ID: rec.ID, Dir: dir, Kernel: img.kernel, Initrd: img.initrd,
		Cmdline: GuestCmdline(rec.Name, accel, cfg.BootArgs, img.tuned), VCPUs: cfg.VCPUs, MemoryMiB: cfg.MemoryMiB,
		Accel: accel, Channel: channel, ConsoleLog: filepath.Join(dir, supervisor.ConsoleLog),
		ConsoleLogMaxBytes: cfg.ConsoleLogMaxBytes,
	}
	if len(cfg.Mounts) > 0 { // mounts.go
		mc.Mounts, mc.Cmdline = machineMounts(cfg.Mounts), mc.Cmdline+" "+mountArgs(cfg.Mounts)
	}
	if cfg.FileMemory {
		mc.MemoryFile = filepath.Join(dir, supervisor.MemoryFile)
	}
	if err := h.attachDisks(ctx, cfg, rec, &mc); err != nil {
		return nil, err
	}
	if channel == hypervisor.ChannelVsock {
		cid, err := h.Store.Allocate(ctx, "vsock-cid", rec.ID, 3, 1<<31)
		if err != nil {
			return nil, fmt.Errorf("allocate vsock cid: %w", err)
		}
		mc.CID = uint32(cid)
	}
	netCfg, err := h.buildNetwork(ctx, cfg, rec, &mc) // netspec.go
	if err != nil {
		return nil, err
	}
	return &supervisor.Spec{Driver: cfg.Hypervisor, Machine: mc, BootTimeout: cfg.BootTimeout, Hostname: rec.Name,
		Persistent: cfg.Persistent, SupervisorBinary: cfg.SupervisorBinary, ImageFingerprint: img.fingerprint,
		MachineLayout: hypervisor.MachineLayout,
		Network:       netCfg}, nil
}

// spawn starts the detached supervisor of VM id (see SpawnSupervisor)
// with the smolvm binary explicit names or SupervisorBinary finds.
func (h *Host) spawn(ctx context.Context, explicit, id string, started, createDone time.Time, log *slog.Logger) error {
	bin, err := SupervisorBinary(explicit)
	if err != nil {
		return err
	}
	return SpawnSupervisor(ctx, bin, h.Home, id, started, createDone, log)
}
