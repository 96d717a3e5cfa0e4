package smolvm

import (
	"context"
	"log/slog"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/network"
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
	var vm *VM
	if err := h.eng.New(ctx, cfg.engineConfig(h.home), started, h.attach(&vm, cfg.Logger)); err != nil {
		return nil, err
	}
	return vm, nil
}

// engineConfig is the checked config (see setDefaults) in the engine's
// types, for a VM of the state folder home.
func (c *Config) engineConfig(home string) engine.VMConfig {
	ec := engine.VMConfig{Name: c.Name, VCPUs: c.VCPUs, MemoryMiB: c.MemoryMiB,
		KernelPath: c.KernelPath, InitrdPath: c.InitrdPath, RootfsPath: c.RootfsPath,
		Image: c.Image, DiskMode: c.DiskMode, DiskSizeMiB: c.DiskSizeMiB, RetainDisk: c.RetainDisk,
		ConsoleLogMaxBytes: c.ConsoleLogMaxBytes, BootArgs: c.BootArgs, Accel: c.Accel, Channel: c.Channel,
		Hypervisor: c.Hypervisor, BootTimeout: c.BootTimeout, Persistent: c.Persistent, SupervisorBinary: c.SupervisorBinary,
		Cold: c.Cold, Network: c.Network, TAPSubnet: c.TAPSubnet, Ports: c.Ports, Egress: network.Egress(c.Egress),
		Hosts: c.Hosts, Logger: c.Logger, Prelaunch: c.Prelaunch, Within: c.withinThenGiveWay(home), SpareRoom: c.spareRoom(home), GiveWay: c.giveWay(home), FileMemory: c.fileMemory}
	if afterMountCheck != nil {
		afterMountCheck(c.Mounts)
	}
	for _, m := range c.Mounts {
		ec.Mounts = append(ec.Mounts, engine.Mount{HostPath: m.HostPath, GuestPath: m.GuestPath, ReadOnly: m.ReadOnly, Within: m.Within})
	}
	return ec
}

// attach is the engine's last step of a create: a handle on the new VM,
// stored in *vm (the in-process supervisor's VM is deleted on Close).
func (h *Host) attach(vm **VM, log *slog.Logger) engine.Attach {
	return func(ctx context.Context, id string, sup *supervisor.Supervisor) error {
		v, err := open(ctx, h, id, log)
		if err != nil {
			return err
		}
		if sup != nil {
			v.sup, v.owned = sup, true
			v.agent = sup.Agent()
		}
		*vm = v
		return nil
	}
}
