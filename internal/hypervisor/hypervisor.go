// Package hypervisor defines the contract between smolvm and a virtual
// machine monitor (QEMU today, Firecracker later): a Driver, registered by
// name, starts Machines from a MachineConfig. A driver declares what it can
// do beyond booting (Capabilities: pause, snapshots, the agent channels,
// TAP, the link to the user-mode network, disk formats); callers check
// before they ask, and a call the driver lacks fails with ErrUnsupported.
// The driver owns its snapshot files (SnapshotLayout) and its copy-on-write
// disk format. hypervistest holds every driver to this contract; fake is a
// driver for unit tests of what drives one.
package hypervisor

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
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
	// StreamSocket connects the NIC to a user-mode network stack listening
	// on this unix socket, over the driver's Capabilities.UserLink.
	StreamSocket string
	// TAP is the name of a TAP device (Capabilities.TAP). With TAPFile
	// set, the hypervisor gets that open queue of the device as a file
	// descriptor and needs no privileges; without it, it opens the device
	// by name itself (which needs CAP_NET_ADMIN).
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
	Mounts    []Mount `json:",omitempty"` // host folders (mount.go)
	Accel     Accel   // resolved: AccelKVM or AccelTCG
	Channel   Channel // resolved: ChannelVirtioSerial or ChannelVsock
	CID       uint32  // vsock context id, when Channel is ChannelVsock
	// ConsoleLog receives the guest's serial console, through the process
	// that started the machine, which keeps at most ConsoleLogMaxBytes of
	// it (the newest; 0 means consolelog.DefaultMaxBytes): see
	// internal/consolelog.
	ConsoleLog         string
	ConsoleLogMaxBytes int64 `json:",omitempty"`
	// MemoryFile, when set, is guest RAM: the guest writes through to this
	// file (Capabilities.MemoryFile), and a snapshot takes the file as it
	// stands instead of writing memory into its state (SnapshotLayout).
	// A machine restored from such a snapshot maps the snapshot's copy of
	// the file copy-on-write: it reads its memory on demand, shared
	// through the host's page cache with every other clone, instead of
	// loading all of it before it runs.
	MemoryFile string `json:",omitempty"`
	// Restore, when set, starts the machine from a snapshot instead of
	// booting the kernel.
	Restore *Restore `json:",omitempty"`
}

// Restore asks for a machine to start from a snapshot.
type Restore struct {
	// Dir is the snapshot folder, in the driver's SnapshotLayout.
	Dir string
}

// RestoreDir is the snapshot folder the machine starts from, or "".
func (c *MachineConfig) RestoreDir() string {
	if c.Restore == nil {
		return ""
	}
	return c.Restore.Dir
}

// UnmarshalJSON reads a machine config, also as smolvm wrote it before
// the restore request (VM rows and snapshot specs outlive an upgrade):
// "Incoming" was the snapshot folder, and a restore's MemoryFile was its
// snapshot's memory file, mapped copy-on-write ("MemoryShared" unset),
// which the driver now finds in the snapshot folder itself. Guest RAM in
// a file ("MemoryShared": true) is MemoryFile as before.
func (c *MachineConfig) UnmarshalJSON(b []byte) error {
	type plain MachineConfig
	var v struct {
		plain
		Incoming string
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*c = MachineConfig(v.plain)
	if v.Incoming != "" && c.Restore == nil {
		c.Restore, c.MemoryFile = &Restore{Dir: v.Incoming}, ""
	}
	return nil
}

// Validate checks the fields every driver needs.
func (c *MachineConfig) Validate() error {
	switch {
	case c.Dir == "":
		return fmt.Errorf("%w: machine config: state folder is empty", errdefs.ErrInvalid)
	case c.Kernel == "" && c.Restore == nil:
		return fmt.Errorf("%w: machine config: no kernel given", errdefs.ErrInvalid)
	case c.Restore != nil && c.Restore.Dir == "":
		return fmt.Errorf("%w: machine config: the restore names no snapshot folder", errdefs.ErrInvalid)
	case c.VCPUs < 1:
		return fmt.Errorf("%w: machine config: vcpus must be at least 1, got %d", errdefs.ErrInvalid, c.VCPUs)
	case c.MemoryMiB < 64:
		return fmt.Errorf("%w: machine config: memory must be at least 64 MiB, got %d", errdefs.ErrInvalid, c.MemoryMiB)
	}
	return nil
}

// LinkKind is how a NIC reaches the user-mode network stack.
type LinkKind string

// Link kinds.
const (
	// LinkNone: the driver cannot connect a NIC to a user-mode stack.
	LinkNone LinkKind = ""
	// LinkStream: Ethernet frames, each after its length as a 4-byte big
	// endian number, over a unix stream socket the stack listens on
	// (NetDevice.StreamSocket; QEMU's -netdev stream).
	LinkStream LinkKind = "stream"
)

// Capabilities is what a driver can do beyond booting a machine. Callers
// check them before they ask: a call the driver lacks fails with
// ErrUnsupported, and the contract test (hypervistest) holds every
// driver to what it declares.
type Capabilities struct {
	// Accels and Channels the driver builds machines with.
	Accels   []Accel
	Channels []Channel
	// Pause: Machine.Pause and Resume freeze and thaw the vCPUs.
	Pause bool
	// Snapshot: Machine.Snapshot saves the machine, and a MachineConfig
	// with Restore starts one from the saved folder. It needs Pause: a
	// saved machine is paused, and resumed to go on.
	Snapshot bool
	// Prelaunch: Driver.Prelaunch starts a machine for a restore ahead of
	// time, and Machine.Move and Machine.Restore finish it.
	Prelaunch bool
	// MemoryFile: guest RAM can be a file (MachineConfig.MemoryFile).
	MemoryFile bool
	// TAP: a NIC can be a TAP device (NetDevice.TAP, TAPFile).
	TAP bool
	// UserLink is how a NIC connects to the user-mode network stack.
	UserLink LinkKind
	// DiskFormats are the formats a Disk may have ("raw", "qcow2").
	DiskFormats []string
	// OverlayFormat is the format of the copy-on-write disks the driver
	// makes (Driver.Overlay) and freezes into snapshots; "" when it
	// makes none.
	OverlayFormat string
}

// Supports tells whether the driver builds machines with accel a.
func (c Capabilities) Supports(a Accel) bool { return slices.Contains(c.Accels, a) }

// HasChannel tells whether the driver gives the agent channel ch.
func (c Capabilities) HasChannel(ch Channel) bool { return slices.Contains(c.Channels, ch) }

// ReadsDisk tells whether the driver reads disks of format f.
func (c Capabilities) ReadsDisk(f string) bool { return slices.Contains(c.DiskFormats, f) }

// Check tells whether a driver of these capabilities can build the
// machine cfg describes; what it cannot is ErrUnsupported, named.
func (c Capabilities) Check(cfg *MachineConfig) error {
	unsupported := func(what string) error { return fmt.Errorf("%s: %w", what, ErrUnsupported) }
	switch {
	case !c.Supports(cfg.Accel):
		return unsupported(fmt.Sprintf("accelerator %q", cfg.Accel))
	case !c.HasChannel(cfg.Channel):
		return unsupported(fmt.Sprintf("agent channel %q", cfg.Channel))
	case cfg.Restore != nil && !c.Snapshot:
		return unsupported("restoring a snapshot")
	case cfg.MemoryFile != "" && !c.MemoryFile:
		return unsupported("guest memory in a file")
	}
	for _, d := range cfg.Disks {
		if f := d.Format; f != "" && !c.ReadsDisk(f) {
			return unsupported(fmt.Sprintf("disk format %q (%s)", f, d.Path))
		}
	}
	for _, n := range cfg.Net {
		switch {
		case (n.TAP != "" || n.TAPFile != nil) && !c.TAP:
			return unsupported("a TAP device (network mode tap)")
		case n.StreamSocket != "" && c.UserLink != LinkStream:
			return unsupported("a link to the user-mode network over a stream socket (network mode user)")
		}
	}
	return nil
}

// SnapshotLayout names the files a driver keeps in a snapshot folder.
// Everything else in the folder (the spec a supervisor writes) is the
// caller's.
type SnapshotLayout struct {
	// State holds the machine's saved state: its devices, and its memory
	// unless Memory holds that.
	State string
	// Memory is guest RAM as a file, in snapshots of machines whose
	// memory was one (MachineConfig.MemoryFile); State then leaves it out.
	Memory string
	// DiskPattern names the frozen copy of writable disk i (a format with
	// one %d).
	DiskPattern string
}

// StatePath is the state file of the snapshot in dir.
func (l SnapshotLayout) StatePath(dir string) string { return filepath.Join(dir, l.State) }

// MemoryPath is the memory file of the snapshot in dir.
func (l SnapshotLayout) MemoryPath(dir string) string { return filepath.Join(dir, l.Memory) }

// Disk is the frozen copy of writable disk i in the snapshot in dir.
func (l SnapshotLayout) Disk(dir string, i int) string {
	return filepath.Join(dir, fmt.Sprintf(l.DiskPattern, i))
}

// Disks lists the frozen disks in the snapshot in dir.
func (l SnapshotLayout) Disks(dir string) []string {
	ds, _ := filepath.Glob(filepath.Join(dir, strings.Replace(l.DiskPattern, "%d", "*", 1)))
	return ds
}

// Driver starts machines.
type Driver interface {
	// Capabilities says what the driver can do beyond booting.
	Capabilities() Capabilities
	// Check reports what the host lacks to run this driver (binary
	// missing, too old), with what to do about it.
	Check(ctx context.Context) error
	// CacheKey identifies the driver's program for caches of what it
	// did (the accelerator probe): it changes when the program is
	// replaced, and costs no process start.
	CacheKey() string
	// Start launches the machine and returns once the hypervisor process
	// is up and its control socket answers. The guest may still be
	// booting; a restored one runs.
	Start(ctx context.Context, cfg *MachineConfig) (Machine, error)
	// Prelaunch starts a machine for the restore cfg.Restore asks for
	// ahead of time (Capabilities.Prelaunch): its process is up and its
	// devices built, and it waits for Machine.Restore to load the
	// snapshot.
	Prelaunch(ctx context.Context, cfg *MachineConfig) (Machine, error)
	// SnapshotLayout names the files of the driver's snapshots.
	SnapshotLayout() SnapshotLayout
	// Overlay makes a disk at path in Capabilities.OverlayFormat that
	// reads base (a frozen disk of a snapshot) and writes to itself.
	Overlay(ctx context.Context, base, path string) error
	// FreezeDisk copies the writable disk src of a paused machine into a
	// snapshot, at dst; FinishDisk then makes the copy depend on nothing
	// under snapshots (the folder of all snapshots) but the read-only
	// image, durable and read-only. FinishDisk runs while the source
	// machine runs on.
	FreezeDisk(ctx context.Context, src, dst string) error
	FinishDisk(ctx context.Context, path, snapshots string) error
}

// Machine is one running hypervisor process. The calls that need a
// capability fail with ErrUnsupported without it.
type Machine interface {
	// PID of the hypervisor process.
	PID() int
	// DialAgent opens the byte stream to the guest agent. Over
	// virtio-serial only one stream exists at a time.
	DialAgent(ctx context.Context) (net.Conn, error)
	// DialFast opens the byte stream to the agent's fast lane
	// (internal/lane).
	DialFast(ctx context.Context) (net.Conn, error)
	// Done is closed when the hypervisor process has exited.
	Done() <-chan struct{}
	// Err says why the process exited, after Done is closed.
	Err() error
	// Kill ends the hypervisor process at once and waits for it.
	Kill() error
	// Info describes the machine for status output.
	Info() Info
	// Pause and Resume freeze and thaw the vCPUs (Capabilities.Pause).
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Snapshot pauses the machine and saves its state into the folder
	// dir in the driver's SnapshotLayout (Capabilities.Snapshot): memory
	// and devices, not the disks (FreezeDisk). With final the machine
	// will not run again (it is killed or discarded afterwards), which
	// spares a copy of a memory file. The machine stays paused.
	Snapshot(ctx context.Context, dir string, final bool) error
	// Move tells a prelaunched machine (Capabilities.Prelaunch) that its
	// state folder is dir now, before anything dials its sockets there,
	// and that its console log keeps at most consoleLogMaxBytes from now
	// on (see MachineConfig.ConsoleLogMaxBytes).
	Move(dir string, consoleLogMaxBytes int64)
	// Restore loads the snapshot a prelaunched machine was started for
	// and lets the guest run; dir is its state folder now. On failure the
	// machine is gone.
	Restore(ctx context.Context, dir string) error
}

// Inspector is a Machine that can describe where its guest is, for the
// report of a boot that never answered: the hypervisor process's state,
// CPU use and threads, the run state and each vCPU's instruction pointer. It
// returns within ctx and says what it could not read.
type Inspector interface {
	Inspect(ctx context.Context) string
}

// Info is what a machine reports about itself.
type Info struct {
	Driver  string  `json:"driver"`
	Version string  `json:"version,omitempty"`
	Accel   Accel   `json:"accel"`
	Channel Channel `json:"channel"`
}

// Default is the driver a VM gets unless its config names another.
const Default = "qemu"

var (
	mu      sync.Mutex
	drivers = map[string]Driver{}
)

// Register makes a driver available by name: a driver package registers
// itself in its init function. It panics on a duplicate.
func Register(name string, d Driver) {
	mu.Lock()
	defer mu.Unlock()
	if _, ok := drivers[name]; ok {
		panic("hypervisor: driver registered twice: " + name)
	}
	drivers[name] = d
}

// Unregister removes a driver (tests register fakes and remove them).
func Unregister(name string) {
	mu.Lock()
	defer mu.Unlock()
	delete(drivers, name)
}

// Get returns the driver registered under name; "" is Default. An
// unknown name is errdefs.ErrInvalid naming the known ones.
func Get(name string) (Driver, error) {
	if name == "" {
		name = Default
	}
	mu.Lock()
	defer mu.Unlock()
	d, ok := drivers[name]
	if !ok {
		return nil, fmt.Errorf("%w: unknown hypervisor %q: use one of %s", errdefs.ErrInvalid, name, strings.Join(namesLocked(), ", "))
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
