package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// VM is a handle on one sandbox. Its methods are safe for concurrent use.
type VM struct {
	id      string
	name    string
	dir     string
	host    *Host
	ownHost bool         // opened for this handle alone: Close closes it
	st      *store.Store // host.st
	log     *slog.Logger

	mu      sync.Mutex
	sup     *supervisor.Supervisor // set when the VM lives in this process
	owned   bool                   // created by New here: Close deletes it
	conn    *grpc.ClientConn       // the VM's API socket
	agent   agentpb.AgentClient
	control controlpb.ControlClient
	closed  bool
	timings Timings
}

// Info describes a VM.
type Info struct {
	ID       string    `json:"id"`
	Name     string    `json:"name"`
	State    State     `json:"state"`
	Reason   string    `json:"reason,omitempty"`
	Created  time.Time `json:"created"`
	Dir      string    `json:"dir"`
	Image    string    `json:"image"`
	Snapshot string    `json:"snapshot,omitempty"`
	// Prelaunched: restored into a hypervisor started ahead of time
	// (Config.Prelaunch).
	Prelaunched   bool    `json:"prelaunched,omitempty"`
	VCPUs         int     `json:"vcpus"`
	MemoryMiB     int     `json:"memory_mib"`
	Accel         string  `json:"accel,omitempty"`
	Channel       string  `json:"channel,omitempty"`
	Persistent    bool    `json:"persistent"`
	SupervisorPID int     `json:"supervisor_pid,omitempty"`
	HypervisorPID int     `json:"hypervisor_pid,omitempty"`
	Timings       Timings `json:"timings"`
	// Hypervisor names the VM's hypervisor and its version, e.g. "qemu
	// 8.2.2" (empty until the VM first ran).
	Hypervisor string `json:"-"`
}

// Open returns a handle on an existing VM of the default state folder by
// id, unique id prefix or name (Host.Open for another folder).
func Open(ctx context.Context, ref string) (*VM, error) {
	h, err := OpenHost("")
	if err != nil {
		return nil, err
	}
	return h.handOver(open(ctx, h, ref, nil))
}

func open(ctx context.Context, h *Host, ref string, log *slog.Logger) (*VM, error) {
	st := h.st
	rec, err := st.GetVM(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("%w (see 'smolvm ls')", err)
	}
	if log == nil {
		log = slog.Default()
	}
	vm := &VM{id: rec.ID, name: rec.Name, dir: rec.Dir, host: h, st: st, log: log}
	_ = json.Unmarshal(rec.Timings, &vm.timings)
	if rec.State == store.StateRunning || rec.State == store.StatePaused {
		if err := vm.connect(); err != nil {
			return nil, err
		}
	}
	return vm, nil
}

func (vm *VM) connect() error {
	conn, err := engine.DialAPI(vm.dir) // internal/engine
	if err != nil {
		return fmt.Errorf("connect to VM %s: %w", vm.id, err)
	}
	vm.conn = conn
	vm.agent = agentpb.NewAgentClient(conn)
	vm.control = controlpb.NewControlClient(conn)
	return nil
}

// ID is the VM's unique id (12 hex digits).
func (vm *VM) ID() string { return vm.id }

// Name is the VM's unique name.
func (vm *VM) Name() string { return vm.name }

// Dir is the VM's state folder.
func (vm *VM) Dir() string { return vm.dir }

// Timings reports the VM's phases (create, launch, first command, and after
// Delete stop + delete).
func (vm *VM) Timings() Timings {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.sup != nil {
		t := Timings(vm.sup.Timings())
		t.StopDelete = vm.timings.StopDelete
		return t
	}
	return vm.timings
}

// agentClient returns a client of the guest agent, or ErrNotRunning.
func (vm *VM) agentClient(ctx context.Context) (agentpb.AgentClient, error) {
	vm.mu.Lock()
	a, closed := vm.agent, vm.closed
	if vm.sup != nil {
		a = vm.sup.Agent()
	}
	vm.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("VM %s: handle is closed", vm.name)
	}
	if a != nil && !vm.pausedHere() {
		return a, nil
	}
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	return nil, notRunning(rec)
}

// lane returns the agent's fast lane when the VM lives in this process
// and the lane can be reached; nil means use the gRPC channel.
func (vm *VM) lane(ctx context.Context) *lane.Client {
	vm.mu.Lock()
	sup, closed := vm.sup, vm.closed
	vm.mu.Unlock()
	if sup == nil || closed || sup.Paused() {
		return nil
	}
	l, err := sup.Lane(ctx)
	if err != nil {
		vm.log.Debug("fast lane unavailable, using gRPC", "err", err)
		return nil
	}
	return l
}

// pausedHere tells whether the VM lives in this process and is paused: its
// calls then fail at once (as the supervisor's proxy does for api.sock)
// instead of waiting for the frozen guest.
func (vm *VM) pausedHere() bool {
	vm.mu.Lock()
	sup := vm.sup
	vm.mu.Unlock()
	return sup != nil && sup.Paused()
}

// notRunning is the ErrNotRunning of a VM that is not running.
var notRunning = engine.NotRunning

// AgentInfo is what the guest agent says about itself.
type AgentInfo struct {
	AgentVersion    string        `json:"agent_version"`
	ProtocolVersion uint32        `json:"protocol_version"`
	Uptime          time.Duration `json:"uptime"`
	Hostname        string        `json:"hostname"`
	Kernel          string        `json:"kernel"`
}

// Ping asks the guest agent for its health; it is the cheapest round trip.
func (vm *VM) Ping(ctx context.Context) (*AgentInfo, error) {
	if l := vm.lane(ctx); l != nil {
		var r agentpb.PingResponse
		err := l.Unary(ctx, lane.TypePing, &agentpb.PingRequest{}, &r)
		if err == nil {
			return agentInfo(&r), nil
		}
		if !errors.Is(err, lane.ErrClosed) {
			return nil, vm.callErr(ctx, "ping", err)
		}
		// The lane broke: a ping can go again, over gRPC.
		vm.log.Debug("fast lane failed, using gRPC", "err", err)
	}
	a, err := vm.agentClient(ctx)
	if err != nil {
		return nil, err
	}
	r, err := a.Ping(ctx, &agentpb.PingRequest{})
	if err != nil {
		return nil, vm.callErr(ctx, "ping", err)
	}
	return agentInfo(r), nil
}

func agentInfo(r *agentpb.PingResponse) *AgentInfo {
	return &AgentInfo{AgentVersion: r.AgentVersion, ProtocolVersion: r.ProtocolVersion,
		Uptime: time.Duration(r.UptimeNs), Hostname: r.Hostname, Kernel: r.Kernel}
}

// callErr explains a failed call: a VM that died or was paused says so,
// and so does a supervisor that does not answer; a gRPC status becomes an
// error of its kind (errdefs), without "rpc error: code = …".
func (vm *VM) callErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	err = errdefs.FromGRPC(err)
	vm.mu.Lock()
	sup := vm.sup
	vm.mu.Unlock()
	if sup != nil && errors.Is(err, lane.ErrClosed) {
		// The channel went down: if the machine is dying, its supervisor
		// is about to record why. Give it a moment, for a better error.
		select {
		case <-sup.Done():
		case <-time.After(2 * time.Second):
		case <-ctx.Done():
		}
	}
	rec, gerr := vm.st.GetVM(context.WithoutCancel(ctx), vm.id)
	if gerr == nil && connectionLost(err) {
		rec = vm.settled(ctx, rec) // lost.go
	}
	if gerr == nil && rec.State != store.StateRunning {
		return fmt.Errorf("%s: %w", what, notRunning(rec))
	}
	if gerr == nil && connectionLost(err) {
		if p := supervisorGone(rec); p != nil {
			return fmt.Errorf("%s: %w", what, p)
		}
	}
	if gerr == nil && errors.Is(err, ErrUnavailable) {
		if p := engine.SupervisorProblem(ctx, rec); p != nil {
			return fmt.Errorf("%s: %w", what, p)
		}
	}
	return fmt.Errorf("%s in VM %s: %w", what, vm.name, err)
}

// apiErr explains a failed call of the supervisor's own services (control,
// network): an error of its kind, or the supervisor not answering; what
// ("" for nothing) prefixes it.
func (vm *VM) apiErr(ctx context.Context, what string, err error) error {
	err = errdefs.FromGRPC(err)
	if errors.Is(err, ErrUnavailable) && ctx.Err() == nil {
		if rec, gerr := vm.st.GetVM(ctx, vm.id); gerr == nil {
			if p := supervisorGone(rec); p != nil {
				err = p
			} else if p := engine.SupervisorProblem(ctx, rec); p != nil {
				err = p
			}
		}
	}
	if what == "" {
		return err
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Info reports the VM's state and settings.
func (vm *VM) Info(ctx context.Context) (*Info, error) {
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	in := infoOf(rec)
	markUnresponsive(in, engine.SupervisorProblem(ctx, rec)) // internal/engine
	return in, nil
}

func infoOf(rec *store.VM) *Info {
	in := &Info{ID: rec.ID, Name: rec.Name, State: State(rec.State), Reason: rec.Reason, Created: rec.Created,
		Dir: rec.Dir, Image: rec.Image, Snapshot: rec.Snapshot, SupervisorPID: rec.SupervisorPID, HypervisorPID: rec.HypervisorPID}
	m := engine.MachineOf(rec)
	in.VCPUs, in.MemoryMiB, in.Persistent, in.Prelaunched = m.VCPUs, m.MemoryMiB, m.Persistent, m.Prelaunched
	in.Accel, in.Channel, in.Hypervisor = m.Accel, m.Channel, m.Hypervisor
	_ = json.Unmarshal(rec.Timings, &in.Timings)
	return in
}

// Stop shuts the VM down gracefully (the guest powers off; after timeout
// it is killed). A stopped VM keeps its state until deleted.
func (vm *VM) Stop(ctx context.Context) error { return vm.stop(ctx, false) }

// Kill stops the VM at once, without a guest shutdown.
func (vm *VM) Kill(ctx context.Context) error { return vm.stop(ctx, true) }

func (vm *VM) stop(ctx context.Context, force bool) error {
	vm.mu.Lock()
	sup, control := vm.sup, vm.control
	vm.mu.Unlock()
	if sup != nil {
		err := sup.Stop(ctx, force, 10*time.Second)
		vm.disconnect()
		return err
	}
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return err
	}
	if control == nil || !rec.Live() {
		if rec.State == store.StateStopped || rec.State == store.StateFailed {
			return nil
		}
		return fmt.Errorf("%w: VM %s is %s", ErrNotRunning, rec.Name, rec.State)
	}
	if p := engine.SupervisorProblem(ctx, rec); p != nil {
		if !force {
			return fmt.Errorf("stop VM %s: %w", rec.Name, p)
		}
		vm.disconnect()
		return engine.KillSupervisor(ctx, vm.st, rec) // internal/engine
	}
	// The supervisor answered: it stops the guest within the timeout
	// (and kills it then); a little more for its answer.
	const stopTimeout = 10 * time.Second
	sctx, cancel := context.WithTimeout(ctx, stopTimeout+5*time.Second)
	_, err = control.Stop(sctx, &controlpb.StopRequest{Force: force, TimeoutMs: stopTimeout.Milliseconds()})
	cancel()
	if err != nil && engine.ProcessAlive(rec.SupervisorPID) {
		if force && (errors.Is(err, ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)) && ctx.Err() == nil {
			// It stopped answering since the probe.
			vm.disconnect()
			return engine.KillSupervisor(ctx, vm.st, rec)
		}
		return vm.apiErr(ctx, "stop VM "+rec.Name, err)
	}
	vm.disconnect()
	// The supervisor records the stop and exits (its teardown takes at
	// most a few seconds); wait for that.
	deadline := time.Now().Add(15 * time.Second)
	for engine.ProcessAlive(rec.SupervisorPID) && rec.SupervisorPID != os.Getpid() {
		if time.Now().After(deadline) {
			if !force {
				return fmt.Errorf("stop VM %s: its supervisor (pid %d) did not exit: 'smolvm rm -f %s' kills it: %w", rec.Name, rec.SupervisorPID, rec.Name, ErrUnavailable)
			}
			return engine.KillSupervisor(ctx, vm.st, rec)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stop VM %s: %w", rec.Name, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	return nil
}

func (vm *VM) disconnect() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.conn != nil {
		_ = vm.conn.Close()
	}
	vm.conn, vm.agent, vm.control, vm.sup = nil, nil, nil, nil
}

// Start boots a stopped VM again (a fresh boot: memory is not kept),
// within the host's capacity as this process sees it (see Capacity).
func (vm *VM) Start(ctx context.Context) error {
	return vm.StartWith(ctx, StartOptions{})
}

// StartOptions are a start's own capacity limits, as Config's are a
// create's: 0 takes the environment's or the host's, -1 is no limit.
type StartOptions struct {
	MaxVMs       int
	MaxMemoryMiB int
}

// StartWith is Start within the limits of opts (a server's --max-vms
// for the VMs it starts again).
func (vm *VM) StartWith(ctx context.Context, opts StartOptions) error {
	cfg := &Config{MaxVMs: opts.MaxVMs, MaxMemoryMiB: opts.MaxMemoryMiB}
	sup, err := vm.host.eng.Start(ctx, vm.id, cfg.within(vm.host.home), vm.log)
	if err != nil {
		return err
	}
	if sup != nil {
		vm.mu.Lock()
		vm.sup, vm.agent = sup, sup.Agent()
		vm.mu.Unlock()
	}
	return vm.connect()
}

// Delete stops the VM at once (no graceful shutdown: its disk is thrown
// away anyway) and removes its state folder and every allocation.
func (vm *VM) Delete(ctx context.Context) error {
	t0 := time.Now()
	err := vm.stop(ctx, true)
	if err != nil && !errors.Is(err, ErrNotRunning) {
		return err
	}
	if err := vm.host.eng.RemoveVM(ctx, vm.id, vm.dir); err != nil {
		return err
	}
	vm.mu.Lock()
	vm.timings.StopDelete = time.Since(t0)
	vm.mu.Unlock()
	vm.log.Debug("phase stop+delete done", "vm", vm.id, "took", time.Since(t0))
	return nil
}

// Close releases the handle. A VM created by New in this process (not
// persistent) is deleted; any other VM keeps running.
func (vm *VM) Close() error {
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		return nil
	}
	owned := vm.owned && vm.sup != nil
	vm.mu.Unlock()
	var err error
	if owned {
		err = vm.Delete(context.Background())
	}
	vm.disconnect()
	vm.mu.Lock()
	vm.closed = true
	vm.mu.Unlock()
	if vm.ownHost {
		err = errors.Join(err, vm.host.Close())
	}
	return err
}

// noAnswer is the error of a call that its timeout ended before the VM
// answered: the supervisor's problem if it has one.
func (vm *VM) noAnswer(what string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*engine.ProbeTimeout)
	defer cancel()
	if rec, err := vm.st.GetVM(ctx, vm.id); err == nil {
		if rec.State != store.StateRunning {
			return fmt.Errorf("%s: %w", what, notRunning(rec))
		}
		if p := engine.SupervisorProblem(ctx, rec); p != nil {
			return fmt.Errorf("%s: %w", what, p)
		}
	}
	return fmt.Errorf("%s: VM %s did not answer within the timeout of %s: %w", what, vm.name, timeout, ErrUnavailable)
}

// markUnresponsive shows a probe's problem in a VM's info.
func markUnresponsive(in *Info, problem error) {
	if problem != nil {
		in.State, in.Reason = StateUnresponsive, problem.Error()
	}
}
