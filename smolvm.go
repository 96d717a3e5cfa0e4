// Package smolvm gives programs disposable, hardware-isolated Linux
// computers: each sandbox is a microVM with its own kernel that boots in
// about a second, runs commands with millisecond round trips and is gone
// when closed.
//
//	vm, err := smolvm.New(ctx, smolvm.Config{})
//	if err != nil { ... }
//	defer vm.Close()
//	res, err := vm.Run(ctx, "uname -a")
//	fmt.Printf("%s", res.Stdout)
//
// A VM created with New lives in the calling process: Close stops and
// deletes it. A persistent VM (Config.Persistent, or `smolvm create`) runs
// under a supervisor process of its own and is reached with Open from any
// process.
package smolvm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/errdefs"
)

// Version of smolvm, set at build time with -ldflags.
var Version = "dev"

// Errors callers can test for with errors.Is, whether the VM runs in this
// process or behind a supervisor (internal/errdefs maps them to gRPC codes
// and back). The CLI maps them to exit codes.
var (
	ErrNotFound    = errdefs.ErrNotFound
	ErrExists      = errdefs.ErrExists
	ErrInUse       = errdefs.ErrInUse
	ErrNotRunning  = errdefs.ErrNotRunning
	ErrInvalid     = errdefs.ErrInvalid
	ErrUnsupported = errdefs.ErrUnsupported
	// ErrUnavailable: the VM's supervisor does not answer (stopped,
	// overloaded); 'smolvm rm -f' still removes the VM.
	ErrUnavailable = errdefs.ErrUnavailable
	// ErrCapacity: the host is at its configured limit of VMs or memory
	// (Config.MaxVMs, Config.MaxMemoryMiB).
	ErrCapacity = errdefs.ErrCapacity
)

// Config describes a VM to create. The zero value is a working default:
// the default image, 1 vCPU, 512 MiB.
type Config struct {
	// Name is unique among VMs; empty picks a generated one.
	Name string
	// VCPUs defaults to 1.
	VCPUs int
	// MemoryMiB defaults to 512; below 64 is refused.
	MemoryMiB int
	// KernelPath, InitrdPath and RootfsPath override the default image.
	KernelPath string
	InitrdPath string
	RootfsPath string
	// Image is a named disk image (see BuildImage, ImportImage, 'smolvm
	// image ls'); "" or "default" is the built-in initramfs image.
	Image string
	// DiskMode is how a disk image is attached: "isolated" (default: a
	// copy-on-write qcow2 overlay per VM) or "shared" (the image itself,
	// read-only).
	DiskMode string
	// DiskSizeMiB grows an isolated disk beyond the image's size.
	DiskSizeMiB int
	// RetainDisk keeps an isolated disk when the VM is deleted, at
	// RetainedDisk(home, name, id).
	RetainDisk bool
	// ConsoleLogMaxBytes bounds the guest console kept on the host
	// (console.log and console.log.1 in the VM's folder, what 'smolvm
	// logs' prints): the newest output is kept. 0 means 1 MiB; the least
	// is 16 KiB.
	ConsoleLogMaxBytes int64
	// BootArgs are appended to the kernel command line.
	BootArgs string
	// Accel is "kvm", "tcg" or "" (KVM when a real boot probe on this
	// host succeeded, TCG otherwise).
	Accel string
	// Channel is "vsock", "virtio-serial" or "" (vsock where the host has
	// /dev/vhost-vsock, else virtio-serial).
	Channel string
	// Hypervisor names the driver that runs the VM; "" is "qemu", the
	// only one so far.
	Hypervisor string
	// BootTimeout bounds the wait for the guest agent; default 90 s.
	BootTimeout time.Duration
	// Persistent runs the VM under a detached supervisor process, so it
	// outlives the calling process. It needs the smolvm binary
	// (SupervisorBinary, else $SMOLVM_BIN, else smolvm in PATH).
	Persistent bool
	// SupervisorBinary is the smolvm CLI used for persistent VMs.
	SupervisorBinary string
	// Cold forces a fresh boot even when a warm snapshot of this VM shape
	// exists (see Setup).
	Cold bool
	// Network is "user" (default: a userspace NAT stack in the VM's
	// supervisor, no root needed), "none" (no NIC) or "tap" (root). See
	// network.go.
	Network string
	// TAPSubnet is the address pool of tap mode, an IPv4 network of /8 to
	// /30 (default DefaultTAPSubnet, 172.16.0.0/16): the host is its first
	// address, each guest leases one of the others.
	TAPSubnet string
	// Ports forward host ports to guest ports, in docker's -p form
	// [IP:]HOST:GUEST (IP defaults to 127.0.0.1; GUEST alone picks a free
	// host port).
	Ports []string
	// Egress is what the guest may reach; the zero value is open.
	Egress Egress
	// Hosts are static name → IPv4 entries the VM's DNS answers (and the
	// egress policy resolves) before the host's resolver (user mode).
	// Their addresses, for names egress allows, are the only ones of the
	// host itself a guest reaches: "svc": {"127.0.0.1"} opens the host's
	// loopback to the guest as svc (192.168.127.254).
	Hosts map[string][]string
	// Mounts are host folders the guest sees from boot on (at most
	// MaxMounts; see Mount). A VM with mounts boots (no warm snapshot
	// restore) and cannot be snapshotted. They need root on the host.
	Mounts []Mount
	// Home is the state folder; default $SMOLVM_HOME, else
	// $XDG_STATE_HOME/smolvm, else ~/.local/state/smolvm.
	Home string
	// Logger receives debug logs naming each phase; nil means slog.Default.
	Logger *slog.Logger
	// Prelaunch keeps one hypervisor started ahead of time, in this
	// process, for the next VM of this shape restored from the warm
	// snapshot: New then only loads the snapshot's device state into it
	// (about 100 ms less under emulation). The spare starts 150 ms after
	// the restore, so that it does not slow the new VM's first command
	// (WaitPrelaunched starts it at once). It costs an idle QEMU process
	// until it is used, DiscardPrelaunched is called or the process
	// exits; it counts against the host's capacity (MaxVMs, MaxMemoryMiB)
	// until then, and is ended when a VM needs its room (a spare never
	// stops a VM). For programs that create VM after VM; persistent VMs
	// ignore it. See prelaunch.go.
	Prelaunch bool
	// MaxVMs and MaxMemoryMiB are the host's capacity, checked when the
	// VM is created, atomically with every other process of the host: a
	// VM that would make more VMs hold host resources (creating, running
	// or paused, in any state folder of the host), or more guest memory,
	// than this fails with ErrCapacity instead of slowing every VM down.
	// 0 takes $SMOLVM_MAX_VMS / $SMOLVM_MAX_MEMORY_MIB, else the host's
	// settings (SetHostCapacity), else DefaultCapacity; -1 is no limit.
	MaxVMs, MaxMemoryMiB int

	// fileMemory backs guest RAM with a shared file in the VM's folder
	// (the warm snapshot's VM: see ensureWarm).
	fileMemory bool
}

// DefaultMemoryMiB is a VM's guest memory unless Config.MemoryMiB says
// otherwise.
const DefaultMemoryMiB = engine.DefaultMemoryMiB

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

func (c *Config) setDefaults() error {
	if c.VCPUs == 0 {
		c.VCPUs = 1
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	switch {
	case c.VCPUs < 1 || c.VCPUs > 64:
		return fmt.Errorf("%w: vcpus must be between 1 and 64, got %d", ErrInvalid, c.VCPUs)
	case c.MemoryMiB < 64:
		return fmt.Errorf("%w: memory must be at least 64 MiB, got %d", ErrInvalid, c.MemoryMiB)
	case c.MemoryMiB > 1<<20:
		return fmt.Errorf("%w: memory of %d MiB is more than 1 TiB", ErrInvalid, c.MemoryMiB)
	case c.ConsoleLogMaxBytes != 0 && c.ConsoleLogMaxBytes < engine.MinConsoleLog:
		return fmt.Errorf("%w: console log size %d: give at least %d bytes (16K)", ErrInvalid, c.ConsoleLogMaxBytes, engine.MinConsoleLog)
	case c.Name != "" && !nameRE.MatchString(c.Name):
		return fmt.Errorf("%w: name %q: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit", ErrInvalid, c.Name)
	}
	switch c.Accel {
	case "", "kvm", "tcg":
	default:
		return fmt.Errorf("%w: accel %q: use kvm, tcg or leave empty", ErrInvalid, c.Accel)
	}
	switch c.Channel {
	case "", "vsock", "virtio-serial":
	default:
		return fmt.Errorf("%w: channel %q: use vsock, virtio-serial or leave empty", ErrInvalid, c.Channel)
	}
	var err error
	if c.Hypervisor, err = engine.CheckDriver(c.Hypervisor); err != nil {
		return err // ErrInvalid, naming the drivers there are
	}
	for _, p := range []struct{ what, path string }{{"kernel", c.KernelPath}, {"initrd", c.InitrdPath}, {"rootfs", c.RootfsPath}} {
		if p.path == "" {
			continue
		}
		if _, err := os.Stat(p.path); err != nil {
			return fmt.Errorf("%w: %s %q: %w", ErrInvalid, p.what, p.path, err)
		}
	}
	if err := checkDiskConfig(c); err != nil {
		return err
	}
	if err := checkMounts(c); err != nil { // mounts.go
		return err
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 90 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Home returns the state folder smolvm uses: $SMOLVM_HOME, else
// $XDG_STATE_HOME/smolvm, else ~/.local/state/smolvm.
func Home() string { return engine.Home() }

// SupervisorMain is the body of the smolvm binary's hidden `__supervise`
// command, which runs a persistent VM's supervisor (see
// Config.SupervisorBinary), and is meant for nothing else: args are the
// command's arguments after its name, as the library wrote them when it
// started the process (their form and the ready pipe on fd 3 are the
// library's own business, so that both ends of it live in one place). It
// starts the VM, reports it ready (or the error, which keeps its kind) to
// the process that created it, and serves the VM until it stops; SIGTERM
// stops the VM gracefully.
func SupervisorMain(ctx context.Context, args []string, log *slog.Logger) error {
	return engine.SupervisorMain(ctx, args, log)
}

// WaitPrelaunched waits until the hypervisors this process is starting
// ahead of time (Config.Prelaunch) are up or have failed; one that waits
// for its delay starts at once.
func WaitPrelaunched(ctx context.Context) error { return engine.WaitPrelaunched(ctx) }

// DiscardPrelaunched ends the hypervisors this process started ahead of
// time (Config.Prelaunch) and removes their folders. VMs that claimed one
// are not affected.
func DiscardPrelaunched(ctx context.Context) error { return engine.DiscardPrelaunched(ctx) }

// Timings are a VM's phases as the seed's benchmark names them.
type Timings struct {
	// Create is the host-side work before the hypervisor starts: state,
	// image, network leases, the spec.
	Create time.Duration `json:"create"`
	// Launch is the supervisor's start of the hypervisor process (and of
	// the VM's network).
	Launch time.Duration `json:"launch"`
	// FirstCommand is the wait from launch until the guest agent answers:
	// the guest's boot, or the load of a snapshot.
	FirstCommand time.Duration `json:"first_command"`
	// CreateToFirstCommand is the whole wait, from the call to a working agent.
	CreateToFirstCommand time.Duration `json:"create_to_first_command"`
	// StopDelete is the VM's stop and deletion (set after Delete).
	StopDelete time.Duration `json:"stop_delete,omitempty"`
}
