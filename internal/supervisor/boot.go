package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/store"
)

// The phases of a boot a user sees, as in the seed's benchmark (DESIGN.md):
// every boot step belongs to one, and logs its name.
const (
	PhaseLaunch       = "launch"        // the hypervisor process up (a restore: the snapshot loaded)
	PhaseFirstCommand = "first command" // the guest agent answers; the VM's API is served
)

// step is one named part of a boot. do makes something the VM needs; undo,
// when set, unmakes it, should a later step fail. A step that fails leaves
// nothing of its own behind.
type step struct {
	phase, name string
	do          func(context.Context) error
	undo        func() error
}

// boot is what the steps of one boot share.
type boot struct {
	mc      hypervisor.MachineConfig // the machine as started (disks and network filled in)
	spare   *Spare                   // the prelaunched hypervisor to restore into, or nil
	started time.Time                // when the user asked for the VM (Options.Started)
	t0      time.Time                // when the launch began
	// early: a restore whose fast lane is connected before the snapshot
	// is loaded (see launch); earlyLane is that lane.
	early     bool
	earlyLane *lane.Client
	overlays  []string // disks the disks step made
}

// bootSteps are the steps of a boot, in order. Each one's undo runs, in
// reverse, when a later one fails; teardown undoes the steps of a VM that
// ran.
func (s *Supervisor) bootSteps(b *boot) []step {
	return []step{
		{PhaseLaunch, "disks", func(ctx context.Context) error { return s.prepareDisks(ctx, b) }, b.removeOverlays},
		{PhaseLaunch, "network", func(ctx context.Context) error { return s.startNetwork(ctx, &b.mc, b.spareNet()) }, s.stopNetwork},
		{PhaseLaunch, "hypervisor", func(ctx context.Context) error { return s.launch(ctx, b) }, s.killMachine},
		{PhaseLaunch, "restore", func(ctx context.Context) error { return s.restore(ctx, b) }, nil},
		{PhaseFirstCommand, "agent", func(ctx context.Context) error { return s.connectAgent(ctx, b) }, s.closeAgent},
		{PhaseFirstCommand, "ready", func(ctx context.Context) error { return s.ready(ctx, b) }, nil},
		{PhaseFirstCommand, "serve", func(context.Context) error { return s.serve() }, s.stopServing},
		{PhaseFirstCommand, "record", s.recordRunning, nil},
	}
}

// runSteps runs steps in order, each timed and logged. When one fails, the
// undo of each step before it runs, last first, and the error is the
// step's joined with the undos' (errors.Join).
func (s *Supervisor) runSteps(ctx context.Context, steps []step) error {
	for i, st := range steps {
		t0 := time.Now()
		err := st.do(ctx)
		if err == nil {
			s.log.Debug("boot step done", "phase", st.phase, "step", st.name, "took", time.Since(t0))
			continue
		}
		s.log.Debug("boot step failed", "phase", st.phase, "step", st.name, "took", time.Since(t0), "err", err)
		errs := []error{err}
		for k := i - 1; k >= 0; k-- {
			if u := steps[k].undo; u != nil {
				if uerr := u(); uerr != nil {
					errs = append(errs, fmt.Errorf("undo boot step %s: %w", steps[k].name, uerr))
				}
			}
		}
		if len(errs) == 1 {
			return err
		}
		return errors.Join(errs...)
	}
	return nil
}

// spareNet is the prelaunched hypervisor's network connection, or nil.
func (b *boot) spareNet() net.Conn {
	if b.spare == nil {
		return nil
	}
	return b.spare.netConn
}

// removeOverlays removes the disks the boot made.
func (b *boot) removeOverlays() error {
	var errs []error
	for _, p := range b.overlays {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// launch starts the hypervisor, or takes the prelaunched one.
func (s *Supervisor) launch(ctx context.Context, b *boot) error {
	mc := &b.mc
	// A restore over virtio-serial connects the fast lane before the
	// snapshot is loaded: the guest then learns of the connection as it
	// resumes, instead of after a hang-up and a connect.
	b.early = mc.Restore != nil && mc.Channel != hypervisor.ChannelVsock && (b.spare != nil || s.caps.Prelaunch)
	var m hypervisor.Machine
	var err error
	switch {
	case b.spare != nil:
		s.log.Debug("phase launch: restoring into a prelaunched hypervisor", "driver", s.spec.Driver, "pid", b.spare.m.PID())
		m = b.spare.m
	case b.early:
		s.log.Debug("phase launch: starting hypervisor", "driver", s.spec.Driver, "accel", mc.Accel, "channel", mc.Channel)
		m, err = s.drv.Prelaunch(ctx, mc) // started, waiting for the snapshot (restore)
	default:
		s.log.Debug("phase launch: starting hypervisor", "driver", s.spec.Driver, "accel", mc.Accel, "channel", mc.Channel)
		m, err = s.drv.Start(ctx, mc)
	}
	if t := s.tapNetwork(); t != nil {
		// The hypervisor holds the TAP queue now (or failed): the device
		// lives as long as it does.
		t.ReleaseFile()
	}
	if err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	s.machine = m
	// The fast lane is dialed soon, so that the guest takes the
	// connection while it boots; a lane that cannot be dialed is tried
	// again on use.
	s.fast = &fastLane{dial: m.DialFast}
	return nil
}

// killMachine ends the hypervisor and the fast lane to it.
func (s *Supervisor) killMachine() error {
	if s.fast != nil {
		s.fast.close()
	}
	if s.machine == nil {
		return nil
	}
	return s.machine.Kill()
}

// dialLane connects the fast lane; failing, it is dialed again on use.
func (s *Supervisor) dialLane(ctx context.Context) {
	if _, err := s.fast.get(ctx); err != nil {
		s.log.Debug("fast lane not connected", "err", err)
	}
}

// restore loads the snapshot into a machine launched ahead of it, its
// fast lane connected first, and ends the launch phase.
func (s *Supervisor) restore(ctx context.Context, b *boot) error {
	if b.early {
		s.dialLane(ctx)
		b.earlyLane = s.fast.current()
		if err := s.machine.Restore(ctx, b.mc.Dir); err != nil {
			return fmt.Errorf("launch: %w", err)
		}
	}
	s.timings.Launch = time.Since(b.t0)
	s.log.Debug("phase launch done", "took", s.timings.Launch, "pid", s.machine.PID())
	return nil
}

// connectAgent makes the agent's gRPC client, which connects on its first
// use (a VM that only runs commands never needs it), and the fast lane.
func (s *Supervisor) connectAgent(ctx context.Context, b *boot) error {
	conn, err := DialAgent(s.machine)
	if err != nil {
		return fmt.Errorf("connect agent: %w", err)
	}
	s.mu.Lock()
	s.agentConn = conn
	s.mu.Unlock()
	if !b.early {
		s.dialLane(ctx)
	}
	return nil
}

// closeAgent closes the agent's gRPC client.
func (s *Supervisor) closeAgent() error {
	s.mu.Lock()
	conn := s.agentConn
	s.mu.Unlock()
	if conn == nil {
		return nil
	}
	return conn.Close()
}

// ready waits for the agent's first answer and ends the first command
// phase. The first call goes over the fast lane. A restored guest's is the
// one that makes it a machine of its own: no separate ping, as every call
// into a just-restored guest runs code the emulator has to translate anew.
func (s *Supervisor) ready(ctx context.Context, b *boot) error {
	s.log.Debug("phase first command: waiting for guest agent", "timeout", s.spec.BootTimeout)
	probe := func(ctx context.Context) error {
		return s.callLane(ctx, lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{})
	}
	if s.spec.Restored {
		probe = s.refresh
	}
	launched := b.t0.Add(s.timings.Launch)
	if err := s.waitReady(ctx, probe); err != nil {
		return err
	}
	now := time.Now()
	if s.spec.Restored {
		s.warmUpSoon(warmUpDelay)
	}
	s.laneEarly = b.earlyLane != nil && s.fast.current() == b.earlyLane
	s.timings.FirstCommand = now.Sub(launched)
	s.timings.CreateToFirstCommand = now.Sub(b.started)
	s.log.Debug("phase first command done", "took", s.timings.FirstCommand, "total", s.timings.CreateToFirstCommand)
	return nil
}

// recordRunning records the running VM in the store.
func (s *Supervisor) recordRunning(ctx context.Context) error {
	tj, _ := json.Marshal(s.timings)
	ij, _ := json.Marshal(s.machine.Info())
	_, err := s.st.UpdateVM(ctx, s.id, func(v *store.VM) error {
		v.State, v.Reason = "running", ""
		v.SupervisorPID, v.HypervisorPID = os.Getpid(), s.machine.PID()
		v.Timings, v.Info = tj, ij
		return nil
	})
	return err
}
