// Package supervisor runs one VM: it starts the hypervisor, connects to the
// guest agent, serves the VM's API socket (its own Control service plus the
// agent's service forwarded to the guest), records state and timings in the
// store, and cleans up when the machine ends. It runs inside the process
// that created the VM (library, `smolvm run`) or as a detached process of
// its own (`smolvm create`).
package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
)

// Files in a VM's state folder that belong to the supervisor.
const (
	APISocket  = "api.sock"
	ConsoleLog = "console.log"
	LogFile    = "supervisor.log"
	// MemoryFile is guest RAM, for a machine whose memory is a file.
	MemoryFile = "ram"
)

// MaxMessage bounds every gRPC message to and from the guest.
const MaxMessage = 8 << 20

// Spec is what a supervisor needs to run a VM; it is stored with the VM.
type Spec struct {
	Driver      string                   `json:"driver"`
	Machine     hypervisor.MachineConfig `json:"machine"`
	BootTimeout time.Duration            `json:"boot_timeout"`
	// Restored VMs get fresh entropy, clock and identity after restore.
	Restored bool `json:"restored,omitempty"`
	// Prelaunched: restored into a hypervisor started ahead of time.
	Prelaunched bool   `json:"prelaunched,omitempty"`
	Hostname    string `json:"hostname,omitempty"`
	// Persistent VMs run under a detached supervisor process.
	Persistent bool `json:"persistent,omitempty"`
	// SupervisorBinary is the smolvm CLI that runs it ("" means look it up).
	SupervisorBinary string `json:"supervisor_binary,omitempty"`
	// ImageFingerprint identifies the kernel, initramfs and agent booted.
	ImageFingerprint string `json:"image_fingerprint,omitempty"`
	// MachineLayout is the hypervisor.MachineLayout the machine was built
	// with; a snapshot restores only into the same layout.
	MachineLayout int `json:"machine_layout,omitempty"`
	// Network is the VM's network (nil: none); forwards added at run time
	// are recorded here.
	Network *network.Config `json:"network,omitempty"`
}

// Timings are the phases a user sees, as in the seed's benchmark.
type Timings struct {
	Create       time.Duration `json:"create"`
	Launch       time.Duration `json:"launch"`
	FirstCommand time.Duration `json:"first_command"`
	// CreateToFirstCommand is the whole wait, from the call to a working agent.
	CreateToFirstCommand time.Duration `json:"create_to_first_command"`
	StopDelete           time.Duration `json:"stop_delete,omitempty"`
}

// Supervisor runs one VM.
type Supervisor struct {
	id      string
	spec    Spec
	st      *store.Store
	log     *slog.Logger
	drv     hypervisor.Driver
	caps    hypervisor.Capabilities
	machine hypervisor.Machine
	net     vmNetwork // user-mode stack or TAP, started before the machine

	agentConn *grpc.ClientConn
	fast      *fastLane
	// laneEarly: the first call went over a lane dialed before the
	// restored guest ran (see start).
	laneEarly bool
	server    *grpc.Server
	listener  net.Listener

	snapMu   sync.Mutex // one snapshot at a time
	mu       sync.Mutex // guards the fields below and agentConn
	stopping bool
	paused   bool          // Control.Pause: calls that need the guest fail at once
	stopped  chan struct{} // closed when teardown is complete
	// consoleFrom is where this boot's output starts in the console log
	// (QEMU appends to it).
	consoleFrom int64
	exitErr     error
	timings     Timings
}

// Options tune Start.
type Options struct {
	Store  *store.Store
	Logger *slog.Logger
	// Started is when the user asked for the VM; phases count from it.
	Started time.Time
	// CreateDone is when allocation of state finished (end of "create").
	CreateDone time.Time
	// Spare, when set, is the prelaunched hypervisor to restore into,
	// claimed already for this VM (its spec describes the spare's machine).
	Spare *Spare
}

// Start launches the VM described by the store row id and returns once its
// agent answers. On failure everything it started is torn down and the row
// is marked failed with the reason.
func Start(ctx context.Context, id string, opts Options) (_ *Supervisor, err error) {
	if opts.Spare != nil {
		defer func() {
			if err != nil {
				opts.Spare.Discard() // whatever of it is left
			}
		}()
	}
	vm, err := opts.Store.GetVM(ctx, id)
	if err != nil {
		return nil, err
	}
	var spec Spec
	if err := json.Unmarshal(vm.Config, &spec); err != nil {
		return nil, fmt.Errorf("read spec of VM %s: %w", id, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Supervisor{id: vm.ID, spec: spec, st: opts.Store, log: log.With("vm", vm.ID), stopped: make(chan struct{})}
	if opts.Started.IsZero() {
		opts.Started = time.Now()
	}
	if opts.CreateDone.IsZero() {
		opts.CreateDone = opts.Started
	}
	s.timings.Create = opts.CreateDone.Sub(opts.Started)
	if err := s.start(ctx, opts); err != nil {
		reason := err.Error() // what start made is undone
		_, uerr := s.st.UpdateVM(context.WithoutCancel(ctx), s.id, func(v *store.VM) error {
			v.State, v.Reason, v.HypervisorPID, v.SupervisorPID = "failed", reason, 0, 0
			return nil
		})
		close(s.stopped)
		return nil, errors.Join(err, uerr)
	}
	go s.watch()
	return s, nil
}

// start boots the machine: the steps of boot.go, run in order, each
// undone in reverse when a later one fails.
func (s *Supervisor) start(ctx context.Context, opts Options) error {
	d, err := hypervisor.Get(s.spec.Driver)
	if err != nil {
		return err
	}
	s.drv, s.caps = d, d.Capabilities()
	b := &boot{mc: s.spec.Machine, spare: opts.Spare, started: opts.Started}
	if err := s.caps.Check(&b.mc); err != nil {
		return err
	}
	s.consoleFrom = consoleSize(filepath.Join(b.mc.Dir, ConsoleLog))
	b.t0 = time.Now()
	return s.runSteps(ctx, s.bootSteps(b))
}

// DialAgent makes a gRPC client of the machine's agent channel. It
// reconnects quickly and waits patiently: the guest may still be booting.
func DialAgent(m hypervisor.Machine) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///agent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return m.DialAgent(ctx) }),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond},
			MinConnectTimeout: 5 * time.Minute,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessage), grpc.MaxCallSendMsgSize(MaxMessage)),
		grpc.WithInitialWindowSize(1<<20), grpc.WithInitialConnWindowSize(4<<20),
	)
}

// Probe boots a machine and waits up to timeout for its agent to answer,
// then kills it. It tells whether an accelerator really works.
func Probe(ctx context.Context, driver string, mc *hypervisor.MachineConfig, timeout time.Duration) error {
	d, err := hypervisor.Get(driver)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	m, err := d.Start(ctx, mc)
	if err != nil {
		return err
	}
	defer m.Kill()
	conn, err := DialAgent(m)
	if err != nil {
		return err
	}
	defer conn.Close()
	go func() {
		select {
		case <-m.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	_, err = agentpb.NewAgentClient(conn).Ping(ctx, &agentpb.PingRequest{}, grpc.WaitForReady(true))
	return err
}

// waitReady runs probe, a first call that waits for the connection, until
// the agent answers, the machine dies or the boot timeout passes; the last
// two fail with the tail of the guest console.
func (s *Supervisor) waitReady(ctx context.Context, probe func(context.Context) error) error {
	timeout := s.spec.BootTimeout
	if timeout <= 0 {
		timeout = 90 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	go func() {
		select {
		case <-s.machine.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	err := probe(ctx)
	if err == nil {
		return nil
	}
	tail := ConsoleTail(filepath.Join(s.spec.Machine.Dir, ConsoleLog), 15)
	select {
	case <-s.machine.Done():
		cause := s.machine.Err()
		if cause == nil { // QEMU exits 0 when the guest resets (-no-reboot)
			cause = errors.New("the hypervisor exited: the guest powered off or rebooted")
			if p := s.guestPanic(); p != "" {
				cause = errors.New("guest kernel panic: " + p)
			}
		}
		return fmt.Errorf("guest died during boot: %w\nlast console lines:\n%s", cause, tail)
	default:
	}
	if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("guest agent did not answer within %s (raise the boot timeout if the host is slow)\nguest: %s\nlast console lines:\n%s", timeout, s.inspect(ctx), tail)
	}
	return fmt.Errorf("wait for guest agent: %w", err)
}

func (s *Supervisor) serve() error {
	path := filepath.Join(s.spec.Machine.Dir, APISocket)
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("serve API socket: %w", err)
	}
	_ = os.Chmod(path, 0o600)
	s.listener = l
	s.server = grpc.NewServer(
		grpc.ForceServerCodec(codec{}),
		// Every error leaves with the code of its kind (errdefs).
		grpc.ChainUnaryInterceptor(errdefs.UnaryServerInterceptor),
		grpc.ChainStreamInterceptor(errdefs.StreamServerInterceptor),
		// Clients ping an idle connection to find a stuck supervisor.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.UnknownServiceHandler(s.proxy),
		grpc.MaxRecvMsgSize(MaxMessage), grpc.MaxSendMsgSize(MaxMessage),
		grpc.InitialWindowSize(1<<20), grpc.InitialConnWindowSize(4<<20),
	)
	controlpb.RegisterControlServer(s.server, &control{s: s})
	var fwd network.Forwarder
	if s.net != nil {
		fwd = s.net
	}
	network.Register(s.server, fwd, s.spec.Network)
	go func() { _ = s.server.Serve(l) }()
	return nil
}

// watch waits for the machine to end and records why.
func (s *Supervisor) watch() {
	<-s.machine.Done()
	err := s.machine.Err()
	s.mu.Lock()
	stopping := s.stopping
	s.mu.Unlock()
	state, reason := "stopped", "stopped"
	switch {
	case stopping:
	case err == nil:
		reason = "guest powered off"
		// A kernel that panics resets the machine at once (panic=-1),
		// which ends QEMU (-no-reboot) as a power off does: the console
		// tells them apart.
		if p := s.guestPanic(); p != "" {
			state, reason = "failed", "guest kernel panic: "+p
			s.log.Error("vm failed: guest kernel panic", "reason", p)
		}
	default:
		state, reason = "failed", "hypervisor exited unexpectedly: "+err.Error()
		s.log.Error("vm failed", "err", err)
	}
	s.teardown()
	// The supervisor pid stays recorded until this process is gone, so
	// cleanup can wait for it.
	_, uerr := s.st.UpdateVM(context.Background(), s.id, func(v *store.VM) error {
		v.State, v.Reason, v.HypervisorPID = state, reason, 0
		return nil
	})
	if uerr != nil && !errors.Is(uerr, store.ErrNotFound) {
		s.log.Error("record vm state", "err", uerr)
	}
	s.mu.Lock()
	if state == "failed" {
		s.exitErr = errors.New(reason)
	}
	s.mu.Unlock()
	close(s.stopped)
}

// guestPanic is the reason of the guest kernel's panic in this boot, or "".
func (s *Supervisor) guestPanic() string {
	return GuestPanic(filepath.Join(s.spec.Machine.Dir, ConsoleLog), s.consoleFrom)
}

// inspect describes where a guest that never answered is (the machine's
// Inspector), logged in full and returned for the boot's error: with an
// empty console (the kernel boots quiet) it is all there is to tell a
// guest halted for good from one that spins or crawls.
func (s *Supervisor) inspect(ctx context.Context) string {
	in, ok := s.machine.(hypervisor.Inspector)
	if !ok {
		return "the hypervisor cannot describe it"
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	state := in.Inspect(ctx)
	s.log.Error("guest agent did not answer", "guest", state)
	return state
}

// teardown releases everything the supervisor holds, machine included:
// the undos of the boot steps that made them, in reverse (the disks stay).
func (s *Supervisor) teardown() {
	for _, undo := range []func() error{s.stopServing, s.closeAgent, s.killMachine, s.stopNetwork} {
		if err := undo(); err != nil {
			s.log.Debug("teardown", "err", err)
		}
	}
}

// stopServing ends the VM's API socket, letting calls in flight finish
// for a moment.
func (s *Supervisor) stopServing() error {
	if s.server != nil {
		done := make(chan struct{})
		go func() { s.server.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			s.server.Stop()
		}
	}
	if err := os.Remove(filepath.Join(s.spec.Machine.Dir, APISocket)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// stopNetwork ends the VM's network.
func (s *Supervisor) stopNetwork() error {
	if s.net != nil {
		s.net.Close()
	}
	return nil
}

// tapNetwork is the VM's TAP network, or nil in another mode.
func (s *Supervisor) tapNetwork() *network.TAP {
	t, _ := s.net.(*network.TAP)
	return t
}

// vmNetwork is a running VM network: the user-mode stack or a TAP.
type vmNetwork interface {
	network.Forwarder
	Close()
}

// startNetwork starts the VM's network before the machine: the user-mode
// stack its NIC connects to, or its TAP device (whose queue QEMU gets as a
// file descriptor), with their port forwards.
func (s *Supervisor) startNetwork(ctx context.Context, mc *hypervisor.MachineConfig, qemuConn net.Conn) error {
	n := s.spec.Network
	if n == nil {
		if qemuConn != nil {
			_ = qemuConn.Close()
		}
		return nil
	}
	opts := network.Options{Config: *n, Dir: mc.Dir, Logger: s.log, Store: s.st, Owner: s.id, Persist: s.persistForwards, QEMUConn: qemuConn}
	switch n.Mode {
	case network.ModeUser:
		ns, err := network.Start(ctx, opts)
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		s.net = ns
		for i := range mc.Net {
			if mc.Net[i].StreamSocket != "" {
				mc.Net[i].StreamSocket = network.SocketPath(mc.Dir)
			}
		}
	case network.ModeTAP:
		t, err := network.StartTAP(ctx, opts)
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		s.net = t
		mc.Net = append([]hypervisor.NetDevice(nil), mc.Net...)
		for i := range mc.Net {
			if mc.Net[i].TAP == n.TAP {
				mc.Net[i].TAPFile = t.File()
			}
		}
		// Record the network namespace the TAP lives in, so cleanup
		// finds it from another one.
		if ns := t.Config().NetNS; ns != n.NetNS {
			if err := s.updateNetwork(ctx, func(c *network.Config) { c.NetNS = ns }); err != nil {
				return fmt.Errorf("record the VM's network namespace: %w", err)
			}
		}
	}
	return nil
}

// persistForwards records the forwards in the VM's stored spec, so a
// restart binds them again.
func (s *Supervisor) persistForwards(ctx context.Context, fwds []network.Forward) error {
	return s.updateNetwork(ctx, func(c *network.Config) { c.Forwards = fwds })
}

// updateNetwork changes the network of the VM's stored spec.
func (s *Supervisor) updateNetwork(ctx context.Context, change func(*network.Config)) error {
	_, err := s.st.UpdateVM(ctx, s.id, func(v *store.VM) error {
		var spec Spec
		if err := json.Unmarshal(v.Config, &spec); err != nil || spec.Network == nil {
			return err
		}
		change(spec.Network)
		b, err := json.Marshal(&spec)
		v.Config = b
		return err
	})
	return err
}

// Agent is a direct client of the guest agent (no proxy hop). It changes
// after a snapshot: call Agent for each use, do not keep it.
func (s *Supervisor) Agent() agentpb.AgentClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.agentConn == nil {
		return nil
	}
	return agentpb.NewAgentClient(s.agentConn)
}

// Timings reports the phases measured so far.
func (s *Supervisor) Timings() Timings {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.timings
}

// Done is closed once the VM has ended and everything is torn down.
func (s *Supervisor) Done() <-chan struct{} { return s.stopped }

// Err says why the VM ended, after Done; nil for a requested stop.
func (s *Supervisor) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exitErr
}

// Stop ends the VM. Unless force, the guest is asked to power off first
// and given timeout to do so.
func (s *Supervisor) Stop(ctx context.Context, force bool, timeout time.Duration) error {
	s.stopMachine(ctx, force, timeout)
	select {
	case <-s.stopped:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stopMachine ends the hypervisor process; teardown follows in watch.
func (s *Supervisor) stopMachine(ctx context.Context, force bool, timeout time.Duration) {
	if !force && s.Paused() {
		// A frozen guest cannot power off: let it run again first.
		if err := s.setPaused(ctx, false); err != nil {
			force = true
		}
	}
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	select {
	case <-s.machine.Done():
		return
	default:
	}
	if !force {
		if timeout <= 0 {
			timeout = 10 * time.Second
		}
		sctx, cancel := context.WithTimeout(ctx, timeout)
		_, _ = s.Agent().Shutdown(sctx, &agentpb.ShutdownRequest{Reboot: true})
		select {
		case <-s.machine.Done():
		case <-sctx.Done():
		}
		cancel()
	}
	_ = s.machine.Kill()
}
