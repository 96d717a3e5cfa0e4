// Package fake is a hypervisor driver for unit tests of what drives one
// (the supervisor): no process, no guest. Each call of the contract is a
// function field; one left nil does what a working driver does. A fake
// machine's fast lane answers pings and refreshes as a guest agent would,
// so a boot reaches a working agent; its gRPC channel is not served.
package fake

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Layout is the fake's snapshot layout.
var Layout = hypervisor.SnapshotLayout{State: "state", Memory: "memory", DiskPattern: "disk%d.fake"}

// Capabilities is everything the contract offers: the fake's default.
func Capabilities() hypervisor.Capabilities {
	return hypervisor.Capabilities{
		Accels:        []hypervisor.Accel{hypervisor.AccelKVM, hypervisor.AccelTCG},
		Channels:      []hypervisor.Channel{hypervisor.ChannelVirtioSerial, hypervisor.ChannelVsock},
		Pause:         true,
		Snapshot:      true,
		Prelaunch:     true,
		MemoryFile:    true,
		TAP:           true,
		UserLink:      hypervisor.LinkStream,
		DiskFormats:   []string{"raw", "fake"},
		OverlayFormat: "fake",
	}
}

// Driver is a fake hypervisor driver. Set the fields before its first use.
type Driver struct {
	// Caps is what the driver declares; nil means Capabilities().
	Caps *hypervisor.Capabilities

	CheckFunc      func(ctx context.Context) error
	StartFunc      func(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error)
	PrelaunchFunc  func(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error)
	OverlayFunc    func(ctx context.Context, base, path string) error
	FreezeDiskFunc func(ctx context.Context, src, dst string) error
	FinishDiskFunc func(ctx context.Context, path, snapshots string) error
	// NewMachine makes the machine Start and Prelaunch return by default
	// (nil: NewMachine), to set its fields.
	NewMachine func(cfg *hypervisor.MachineConfig) *Machine

	mu       sync.Mutex
	machines []*Machine
}

var _ hypervisor.Driver = (*Driver)(nil)
var _ hypervisor.Machine = (*Machine)(nil)

// Register registers d under a name of its own for the test's length and
// returns the name.
func Register(t interface {
	Name() string
	Cleanup(func())
}, d *Driver) string {
	name := fmt.Sprintf("fake-%s-%d", t.Name(), registered.Add(1))
	hypervisor.Register(name, d)
	t.Cleanup(func() { hypervisor.Unregister(name) })
	return name
}

var registered atomic.Int64

// Machines are the machines the driver made by default, oldest first.
func (d *Driver) Machines() []*Machine {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*Machine(nil), d.machines...)
}

// Capabilities implements hypervisor.Driver.
func (d *Driver) Capabilities() hypervisor.Capabilities {
	if d.Caps != nil {
		return *d.Caps
	}
	return Capabilities()
}

// Check implements hypervisor.Driver.
func (d *Driver) Check(ctx context.Context) error {
	if d.CheckFunc != nil {
		return d.CheckFunc(ctx)
	}
	return nil
}

// CacheKey implements hypervisor.Driver.
func (d *Driver) CacheKey() string { return "fake" }

// SnapshotLayout implements hypervisor.Driver.
func (d *Driver) SnapshotLayout() hypervisor.SnapshotLayout { return Layout }

// Start implements hypervisor.Driver: by default a machine that runs (a
// restore: loaded).
func (d *Driver) Start(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error) {
	if d.StartFunc != nil {
		return d.StartFunc(ctx, cfg)
	}
	if err := d.check(cfg); err != nil {
		return nil, err
	}
	m := d.machine(cfg)
	if cfg.Restore != nil {
		if err := m.Restore(ctx, cfg.Dir); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Prelaunch implements hypervisor.Driver.
func (d *Driver) Prelaunch(ctx context.Context, cfg *hypervisor.MachineConfig) (hypervisor.Machine, error) {
	if d.PrelaunchFunc != nil {
		return d.PrelaunchFunc(ctx, cfg)
	}
	if !d.Capabilities().Prelaunch {
		return nil, fmt.Errorf("prelaunch: %w", hypervisor.ErrUnsupported)
	}
	if cfg.Restore == nil {
		return nil, errors.New("prelaunch: the machine config names no snapshot to restore")
	}
	if err := d.check(cfg); err != nil {
		return nil, err
	}
	return d.machine(cfg), nil
}

// check refuses what a real driver refuses.
func (d *Driver) check(cfg *hypervisor.MachineConfig) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	return d.Capabilities().Check(cfg)
}

func (d *Driver) machine(cfg *hypervisor.MachineConfig) *Machine {
	var m *Machine
	if d.NewMachine != nil {
		m = d.NewMachine(cfg)
	} else {
		m = NewMachine(cfg)
	}
	m.caps = d.Capabilities()
	d.mu.Lock()
	d.machines = append(d.machines, m)
	d.mu.Unlock()
	return m
}

// Overlay implements hypervisor.Driver: by default a file at path that
// names base.
func (d *Driver) Overlay(ctx context.Context, base, path string) error {
	if d.OverlayFunc != nil {
		return d.OverlayFunc(ctx, base, path)
	}
	return os.WriteFile(path, []byte("overlay of "+base), 0o600)
}

// FreezeDisk implements hypervisor.Driver: by default a copy.
func (d *Driver) FreezeDisk(ctx context.Context, src, dst string) error {
	if d.FreezeDiskFunc != nil {
		return d.FreezeDiskFunc(ctx, src, dst)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o600)
}

// FinishDisk implements hypervisor.Driver: by default it makes the copy
// read-only.
func (d *Driver) FinishDisk(ctx context.Context, path, snapshots string) error {
	if d.FinishDiskFunc != nil {
		return d.FinishDiskFunc(ctx, path, snapshots)
	}
	return os.Chmod(path, 0o400)
}

// Machine is a fake machine: a process that runs until Kill (or Exit).
type Machine struct {
	PauseFunc     func(ctx context.Context) error
	ResumeFunc    func(ctx context.Context) error
	SnapshotFunc  func(ctx context.Context, dir string, final bool) error
	RestoreFunc   func(ctx context.Context, dir string) error
	DialAgentFunc func(ctx context.Context) (net.Conn, error)
	DialFastFunc  func(ctx context.Context) (net.Conn, error)
	KillFunc      func() error

	caps hypervisor.Capabilities
	cfg  hypervisor.MachineConfig
	done chan struct{}

	mu     sync.Mutex
	err    error
	dir    string
	paused bool
	kills  int
	lanes  []net.Conn // the guest ends of the fast lanes
	runs   [][]string // the argv of each command run on a lane
}

// Runs returns the argv (or ["sh", "-c", shell]) of each command run on
// the machine's fast lanes, in order.
func (m *Machine) Runs() [][]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([][]string(nil), m.runs...)
}

// NewMachine is a running machine of cfg with the default calls.
func NewMachine(cfg *hypervisor.MachineConfig) *Machine {
	return &Machine{cfg: *cfg, dir: cfg.Dir, done: make(chan struct{}), caps: Capabilities()}
}

// Exit ends the machine as its process's exit would, with err (nil: the
// guest powered off).
func (m *Machine) Exit(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.done:
		return
	default:
	}
	m.err = err
	for _, c := range m.lanes {
		_ = c.Close()
	}
	close(m.done)
}

// Config is the machine's config as it was started.
func (m *Machine) Config() hypervisor.MachineConfig { return m.cfg }

// Paused tells whether the machine is paused.
func (m *Machine) Paused() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.paused
}

// Kills counts the calls of Kill.
func (m *Machine) Kills() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.kills
}

// Dir is the machine's state folder now (Move changes it).
func (m *Machine) Dir() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.dir
}

// PID implements hypervisor.Machine: the test process's.
func (m *Machine) PID() int { return os.Getpid() }

// Done implements hypervisor.Machine.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Err implements hypervisor.Machine.
func (m *Machine) Err() error {
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Info implements hypervisor.Machine.
func (m *Machine) Info() hypervisor.Info {
	return hypervisor.Info{Driver: "fake", Accel: m.cfg.Accel, Channel: m.cfg.Channel}
}

// Kill implements hypervisor.Machine.
func (m *Machine) Kill() error {
	m.mu.Lock()
	m.kills++
	m.mu.Unlock()
	if m.KillFunc != nil {
		if err := m.KillFunc(); err != nil {
			return err
		}
	}
	m.Exit(errors.New("killed"))
	return nil
}

func (m *Machine) alive() error {
	select {
	case <-m.done:
		return errors.New("fake machine: exited")
	default:
		return nil
	}
}

// DialAgent implements hypervisor.Machine: by default the agent's gRPC
// channel is not served.
func (m *Machine) DialAgent(ctx context.Context) (net.Conn, error) {
	if m.DialAgentFunc != nil {
		return m.DialAgentFunc(ctx)
	}
	return nil, errors.New("fake machine: no gRPC agent")
}

// DialFast implements hypervisor.Machine: by default a lane whose agent
// answers pings and refreshes.
func (m *Machine) DialFast(ctx context.Context) (net.Conn, error) {
	if m.DialFastFunc != nil {
		return m.DialFastFunc(ctx)
	}
	if err := m.alive(); err != nil {
		return nil, err
	}
	host, guest := net.Pipe()
	m.mu.Lock()
	m.lanes = append(m.lanes, guest)
	m.mu.Unlock()
	go m.serveLane(guest)
	return host, nil
}

// serveLane answers each ping and refresh with an empty reply, each
// command with its exit (code 0, no output), and every other call with an
// error.
func (m *Machine) serveLane(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 4096)
	for {
		f, err := lane.Read(c, buf)
		if err != nil {
			return
		}
		var out []byte
		switch f.Type {
		case lane.TypePing, lane.TypeRefresh:
			out, _ = lane.Append(nil, f.ID, f.Type, nil)
		case lane.TypeRun:
			var start agentpb.ExecStart
			if err := proto.Unmarshal(f.Payload, &start); err != nil {
				out = lane.AppendError(nil, f.ID, err.Error())
				break
			}
			argv := start.GetArgv()
			if start.GetShell() != "" {
				argv = []string{"sh", "-c", start.GetShell()}
			}
			m.mu.Lock()
			m.runs = append(m.runs, argv)
			m.mu.Unlock()
			out, _ = lane.Append(nil, f.ID, lane.TypeOutput, &agentpb.RunOutput{Exit: &agentpb.ExecExit{}})
		case lane.TypeAck:
			continue
		default:
			out = lane.AppendError(nil, f.ID, fmt.Sprintf("fake agent: no call of type %d", f.Type))
		}
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// Pause implements hypervisor.Machine.
func (m *Machine) Pause(ctx context.Context) error { return m.setPaused(ctx, true, m.PauseFunc) }

// Resume implements hypervisor.Machine.
func (m *Machine) Resume(ctx context.Context) error { return m.setPaused(ctx, false, m.ResumeFunc) }

func (m *Machine) setPaused(ctx context.Context, pause bool, f func(context.Context) error) error {
	if !m.caps.Pause {
		return fmt.Errorf("pause: %w", hypervisor.ErrUnsupported)
	}
	if f != nil {
		if err := f(ctx); err != nil {
			return err
		}
	} else if err := m.alive(); err != nil {
		return err
	}
	m.mu.Lock()
	m.paused = pause
	m.mu.Unlock()
	return nil
}

// Snapshot implements hypervisor.Machine: by default the layout's state
// file, and its memory file for a machine whose memory is a file.
func (m *Machine) Snapshot(ctx context.Context, dir string, final bool) error {
	if !m.caps.Snapshot {
		return fmt.Errorf("snapshot: %w", hypervisor.ErrUnsupported)
	}
	if err := m.Pause(ctx); err != nil {
		return err
	}
	if m.SnapshotFunc != nil {
		return m.SnapshotFunc(ctx, dir, final)
	}
	if err := os.WriteFile(Layout.StatePath(dir), []byte("state of "+m.cfg.ID), 0o600); err != nil {
		return err
	}
	if m.cfg.MemoryFile != "" {
		return os.WriteFile(Layout.MemoryPath(dir), []byte("memory of "+m.cfg.ID), 0o600)
	}
	return nil
}

// Move implements hypervisor.Machine.
func (m *Machine) Move(dir string, consoleLogMaxBytes int64) {
	m.mu.Lock()
	m.dir, m.cfg.ConsoleLogMaxBytes = dir, consoleLogMaxBytes
	m.mu.Unlock()
}

// Restore implements hypervisor.Machine: by default it checks that the
// snapshot's state file is there. On failure the machine is gone.
func (m *Machine) Restore(ctx context.Context, dir string) error {
	err := m.restore(ctx, dir)
	if err != nil {
		_ = m.Kill()
		return fmt.Errorf("restore snapshot: %w", err)
	}
	return nil
}

func (m *Machine) restore(ctx context.Context, dir string) error {
	if !m.caps.Snapshot {
		return hypervisor.ErrUnsupported
	}
	if m.cfg.Restore == nil {
		return errors.New("the machine was not started for a restore")
	}
	m.mu.Lock()
	m.dir = dir
	m.mu.Unlock()
	if m.RestoreFunc != nil {
		return m.RestoreFunc(ctx, dir)
	}
	_, err := os.Stat(Layout.StatePath(m.cfg.Restore.Dir))
	return err
}
