package main

import (
	"fmt"
	"time"

	"github.com/spf13/pflag"

	"github.com/smolvm/smolvm"
)

// vmFlags are the flags shared by run and create.
type vmFlags struct {
	name        string
	cpus        int
	memory      int
	kernel      string
	initrd      string
	rootfs      string
	bootArgs    string
	accel       string
	channel     string
	bootTimeout time.Duration
	cold        bool
	image       string
	diskMode    string
	diskSize    string
	retainDisk  bool
	consoleSize string
	mounts      []string
	net         netFlags      // port.go
	capacity    capacityFlags // capacity.go
}

func (f *vmFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.name, "name", "", "name of the VM (default: generated)")
	fs.IntVar(&f.cpus, "cpus", 1, "number of vCPUs")
	fs.IntVarP(&f.memory, "memory", "m", 512, "memory in MiB")
	fs.StringVar(&f.kernel, "kernel", "", "boot this kernel instead of the default image's")
	fs.StringVar(&f.initrd, "initrd", "", "boot this initramfs instead of the default image's")
	fs.StringVar(&f.rootfs, "rootfs", "", "attach this disk image (raw or .qcow2) as /dev/vda")
	fs.StringVar(&f.bootArgs, "boot-args", "", "extra kernel command line arguments")
	fs.StringVar(&f.accel, "accel", "", "kvm or tcg (default: KVM when a test boot with it works)")
	fs.StringVar(&f.channel, "channel", "", "vsock or virtio-serial (default: vsock when the host has it)")
	fs.DurationVar(&f.bootTimeout, "boot-timeout", 90*time.Second, "how long to wait for the guest agent")
	fs.BoolVar(&f.cold, "cold", false, "boot the kernel even when a warm snapshot could be restored")
	fs.StringVar(&f.image, "image", "", "boot this disk image (see 'smolvm image ls'; default: the initramfs image)")
	fs.StringVar(&f.diskMode, "disk-mode", "", "isolated (a copy-on-write overlay per VM, default) or shared (the image, read-only)")
	fs.StringVar(&f.diskSize, "disk-size", "", "grow the VM's disk to this size, e.g. 4G (isolated mode)")
	fs.BoolVar(&f.retainDisk, "retain-disk", false, "keep the VM's disk overlay when it is deleted ($SMOLVM_HOME/disks)")
	fs.StringVar(&f.consoleSize, "console-log-size", "1M", "keep at most this much of the guest console on the host (the newest), e.g. 256K, 4M")
	fs.StringArrayVar(&f.mounts, "mount", nil, "share a host folder with the guest: HOST_DIR:GUEST_DIR[:ro|rw] (read-only unless :rw; repeatable)")
	f.net.register(fs)
	f.capacity.register(fs, "this VM")
}

func (f *vmFlags) config(g *globals) (smolvm.Config, error) {
	if f.memory < 64 {
		return smolvm.Config{}, fmt.Errorf("%w: --memory %d: give at least 64 (MiB)", smolvm.ErrInvalid, f.memory)
	}
	if f.cpus < 1 {
		return smolvm.Config{}, fmt.Errorf("%w: --cpus %d: give at least 1", smolvm.ErrInvalid, f.cpus)
	}
	if f.bootTimeout <= 0 {
		return smolvm.Config{}, fmt.Errorf("%w: --boot-timeout must be positive", smolvm.ErrInvalid)
	}
	diskMiB, err := smolvm.ParseSizeMiB(f.diskSize)
	if err != nil {
		return smolvm.Config{}, err
	}
	consoleBytes, err := smolvm.ParseSizeBytes(f.consoleSize)
	if err != nil {
		return smolvm.Config{}, fmt.Errorf("--console-log-size: %w", err)
	}
	netCfg, err := f.net.config()
	if err != nil {
		return smolvm.Config{}, err
	}
	maxVMs, maxMemMiB, err := f.capacity.limits()
	if err != nil {
		return smolvm.Config{}, err
	}
	var mounts []smolvm.Mount
	for _, s := range f.mounts {
		m, err := smolvm.ParseMount(s)
		if err != nil {
			return smolvm.Config{}, fmt.Errorf("--mount: %w", err)
		}
		mounts = append(mounts, m)
	}
	return smolvm.Config{
		Network: netCfg.Network, Ports: netCfg.Ports, Egress: netCfg.Egress, Hosts: netCfg.Hosts, TAPSubnet: netCfg.TAPSubnet,
		Image: f.image, DiskMode: f.diskMode, DiskSizeMiB: diskMiB, RetainDisk: f.retainDisk,
		Name: f.name, VCPUs: f.cpus, MemoryMiB: f.memory,
		KernelPath: f.kernel, InitrdPath: f.initrd, RootfsPath: f.rootfs, BootArgs: f.bootArgs,
		Accel: f.accel, Channel: f.channel, BootTimeout: f.bootTimeout, Cold: f.cold, Logger: g.log,
		ConsoleLogMaxBytes: consoleBytes, Mounts: mounts, MaxVMs: maxVMs, MaxMemoryMiB: maxMemMiB,
	}, nil
}
