// Package hypervisor defines the contract between smolvm and a virtual
// machine monitor (QEMU today, Firecracker later): a Driver starts Machines
// from a MachineConfig. Optional powers (pause, snapshots) are separate
// interfaces found by type assertion; a driver without them returns
// ErrUnsupported.
package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/wire"
)

// ErrUnsupported is returned for an optional power a driver lacks.
var ErrUnsupported = fmt.Errorf("%w by this hypervisor driver", errdefs.ErrUnsupported)

// Accel names how guest code runs.
type Accel string

// Accelerators.
const (
	AccelAuto Accel = ""    // KVM when a real boot probe succeeded, TCG otherwise
	AccelKVM  Accel = "kvm" // hardware virtualization
	AccelTCG  Accel = "tcg" // QEMU's software emulation
)

// Channel names the byte stream to the guest agent.
type Channel string

// Channels.
const (
	ChannelAuto         Channel = ""              // vsock where the host has /dev/vhost-vsock, else virtio-serial
	ChannelVirtioSerial Channel = "virtio-serial" // virtserialport backed by a unix socket
	ChannelVsock        Channel = "vsock"         // AF_VSOCK through vhost-vsock
)

// AgentPortName is the virtio-serial port name the guest agent looks for.
const AgentPortName = wire.AgentPortName

// FastPortName is the virtio-serial port of the agent's fast lane.
const FastPortName = wire.FastPortName

// MachineLayout versions the virtual hardware the drivers build (devices,
// memory backend). A snapshot holds device state for one layout and cannot
// be restored into another: bump it when a change to the machine would
// break restoring snapshots taken before it.
const MachineLayout = 6

// AgentVsockPort is the vsock port the guest agent listens on.
const AgentVsockPort = wire.AgentVsockPort

// FastVsockPort is the vsock port of the agent's fast lane.
const FastVsockPort = wire.FastVsockPort

// Disk is one block device given to the guest.
type Disk struct {
	Path     string // image file
	Format   string // "raw" or "qcow2"
	ReadOnly bool
}

// NetDevice attaches one NIC. Exactly one backend field is set.
type NetDevice struct {
	MAC string
	// StreamSocket connects the NIC to a userspace network stack listening
	// on this unix socket (QEMU -netdev stream / dgram).
	StreamSocket string
	// TAP is the name of a TAP device. With TAPFile set, QEMU gets that
	// open queue of the device as a file descriptor (-netdev tap,fd=N)
	// and needs no privileges; without it QEMU opens the device by name
	// itself (which needs CAP_NET_ADMIN).
	TAP     string
	TAPFile *os.File `json:"-"`
}

// MachineConfig is everything a driver needs to start one machine.
type MachineConfig struct {
	ID        string
	Dir       string // the VM's state folder; sockets and logs go here
	Kernel    string
	Initrd    string
	Cmdline   string
	VCPUs     int
	MemoryMiB int
	Disks     []Disk
	Net       []NetDevice
	Accel     Accel   // resolved: AccelKVM or AccelTCG
	Channel   Channel // resolved: ChannelVirtioSerial or ChannelVsock
	CID       uint32  // vsock context id, when Channel is ChannelVsock
	// ConsoleLog receives the guest's serial console, through the process
	// that started the machine, which keeps at most ConsoleLogMaxBytes of
	// it (the newest; 0 means consolelog.DefaultMaxBytes): see
	// internal/consolelog.
	ConsoleLog         string
	ConsoleLogMaxBytes int64 `json:",omitempty"`
	// Incoming, when set, starts the machine from this snapshot folder
	// instead of booting the kernel.
	Incoming string
	// MemoryFile, when set, backs guest RAM with this file instead of
	// anonymous memory. With MemoryShared the guest writes through to the
	// file, which then is the guest's memory, and a snapshot's migration
	// stream leaves it out (device state only). Without it the file is
	// mapped copy-on-write: a machine restored from a snapshot that holds
	// such a file reads its memory from there on demand, shared through
	// the host's page cache with every other clone, instead of loading
	// all of it before it runs. A private file is used only to restore.
	MemoryFile   string `json:",omitempty"`
	MemoryShared bool   `json:",omitempty"`
}

// SnapshotRAM is the guest memory file in a snapshot folder, for machines
// whose memory was a shared file (MachineConfig.MemoryFile); the
// migration stream in the folder then holds device state only.
const SnapshotRAM = "ram"

// Validate checks the fields every driver needs.
func (c *MachineConfig) Validate() error {
	switch {
	case c.Dir == "":
		return errors.New("machine config: state folder is empty")
	case c.Kernel == "" && c.Incoming == "":
		return errors.New("machine config: no kernel given")
	case c.VCPUs < 1:
		return fmt.Errorf("machine config: vcpus must be at least 1, got %d", c.VCPUs)
	case c.MemoryMiB < 64:
		return fmt.Errorf("machine config: memory must be at least 64 MiB, got %d", c.MemoryMiB)
	}
	return nil
}

// Driver starts machines.
type Driver interface {
	// Name is the registry name, e.g. "qemu".
	Name() string
	// Check reports what the host lacks to run this driver (binary
	// missing, too old), with what to do about it.
	Check(ctx context.Context) error
	// Start launches the machine and returns once the hypervisor process
	// is up and its control socket answers. The guest may still be booting.
	Start(ctx context.Context, cfg *MachineConfig) (Machine, error)
}

// Machine is one running hypervisor process.
type Machine interface {
	// PID of the hypervisor process.
	PID() int
	// DialAgent opens the byte stream to the guest agent. Over
	// virtio-serial only one stream exists at a time.
	DialAgent(ctx context.Context) (net.Conn, error)
	// DialFast opens the byte stream to the agent's fast lane (ttrpc).
	DialFast(ctx context.Context) (net.Conn, error)
	// Done is closed when the hypervisor process has exited.
	Done() <-chan struct{}
	// Err says why the process exited, after Done is closed.
	Err() error
	// Kill ends the hypervisor process at once and waits for it.
	Kill() error
	// Info describes the machine for status output.
	Info() Info
}

// Info is what a machine reports about itself.
type Info struct {
	Driver  string  `json:"driver"`
	Version string  `json:"version,omitempty"`
	Accel   Accel   `json:"accel"`
	Channel Channel `json:"channel"`
}

// Prelauncher is implemented by drivers that can start a machine ahead of
// time for the restore of a snapshot (MachineConfig.Incoming): the
// hypervisor process is up and its devices built, and the machine waits
// for Incoming to load the snapshot.
type Prelauncher interface {
	Prelaunch(ctx context.Context, cfg *MachineConfig) (Machine, error)
}

// Incomer is implemented by prelaunched machines: Incoming loads the
// snapshot and lets the guest run. dir is the machine's state folder,
// which may have moved since the machine started (sockets and logs in it
// stay valid across a rename).
type Incomer interface {
	// Move tells a machine waiting for its snapshot that its state folder
	// is dir now, before anything dials its sockets there, and that its
	// console log keeps at most consoleLogMaxBytes from now on (see
	// MachineConfig.ConsoleLogMaxBytes).
	Move(dir string, consoleLogMaxBytes int64)
	Incoming(ctx context.Context, dir string) error
}

// Pauser is implemented by machines that can pause and resume vCPUs.
type Pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// Snapshotter is implemented by machines that can save their whole state
// (memory and devices) into a folder. The machine is paused afterwards.
type Snapshotter interface {
	Snapshot(ctx context.Context, dir string) error
}

var (
	mu      sync.Mutex
	drivers = map[string]Driver{}
)

// Register makes a driver available by name. It panics on a duplicate.
func Register(d Driver) {
	mu.Lock()
	defer mu.Unlock()
	if _, ok := drivers[d.Name()]; ok {
		panic("hypervisor: driver registered twice: " + d.Name())
	}
	drivers[d.Name()] = d
}

// Get returns the driver registered under name.
func Get(name string) (Driver, error) {
	mu.Lock()
	defer mu.Unlock()
	d, ok := drivers[name]
	if !ok {
		return nil, fmt.Errorf("unknown hypervisor %q (have: %v)", name, namesLocked())
	}
	return d, nil
}

// Names lists the registered drivers.
func Names() []string {
	mu.Lock()
	defer mu.Unlock()
	return namesLocked()
}

func namesLocked() []string {
	var n []string
	for k := range drivers {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// WaitSocket polls until a unix socket at path accepts connections.
func WaitSocket(ctx context.Context, path string, done <-chan struct{}) (net.Conn, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for %s: %w", path, ctx.Err())
		case <-done:
			return nil, fmt.Errorf("wait for %s: hypervisor exited", path)
		case <-time.After(2 * time.Millisecond):
		}
	}
}
