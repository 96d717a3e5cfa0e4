package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/hypervisor/fake"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// The supervisor's logic against the fake driver: boot steps, what a
// failed boot undoes, restore, pause and snapshot. (The real thing, with
// QEMU, is in the root package's VM tests.)

// vmFixture is one VM of a fake driver, recorded in a store of its own.
type vmFixture struct {
	t    *testing.T
	drv  *fake.Driver
	st   *store.Store
	spec Spec
	dir  string
	snap string // a snapshot folder of the fake's layout, with one frozen disk
}

func newFixture(t *testing.T, drv *fake.Driver) *vmFixture {
	t.Helper()
	st, err := store.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	dir, err := os.MkdirTemp("", "svt") // short: a unix socket goes in it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &vmFixture{t: t, drv: drv, st: st, dir: dir, snap: t.TempDir()}
	f.spec = Spec{
		Driver: fake.Register(t, drv),
		Machine: hypervisor.MachineConfig{ID: "vm", Dir: dir, Kernel: "vmlinux", VCPUs: 1, MemoryMiB: 256,
			Accel: hypervisor.AccelTCG, Channel: hypervisor.ChannelVirtioSerial, ConsoleLog: filepath.Join(dir, ConsoleLog)},
		BootTimeout: time.Minute, Hostname: "vm",
	}
	for _, p := range []string{fake.Layout.StatePath(f.snap), fake.Layout.Disk(f.snap, 0)} {
		if err := os.WriteFile(p, []byte("saved"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// withDisk gives the VM its overlay disk (in its folder).
func (f *vmFixture) withDisk() *vmFixture {
	f.spec.Machine.Disks = []hypervisor.Disk{{Path: filepath.Join(f.dir, "disk.fake"), Format: "fake"}}
	return f
}

// restored makes the VM a clone of the fixture's snapshot.
func (f *vmFixture) restored() *vmFixture {
	f.spec.Restored = true
	f.spec.Machine.Restore = &hypervisor.Restore{Dir: f.snap}
	return f
}

// withNetwork gives the VM the user-mode network.
func (f *vmFixture) withNetwork() *vmFixture {
	f.spec.Network = &network.Config{Mode: network.ModeUser}
	f.spec.Machine.Net = []hypervisor.NetDevice{{MAC: network.GuestMAC, StreamSocket: network.SocketPath(f.dir)}}
	return f
}

// start records the VM and starts its supervisor; a running one is
// stopped when the test ends.
func (f *vmFixture) start() (*Supervisor, string, error) {
	f.t.Helper()
	b, err := json.Marshal(&f.spec)
	if err != nil {
		f.t.Fatal(err)
	}
	rec := &store.VM{Dir: f.dir, Config: b}
	if err := f.st.CreateVM(context.Background(), rec); err != nil {
		f.t.Fatal(err)
	}
	s, err := Start(context.Background(), rec.ID, Options{Store: f.st, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if s != nil {
		f.t.Cleanup(func() { _ = s.Stop(context.Background(), true, 0) })
	}
	return s, rec.ID, err
}

func (f *vmFixture) state(id string) *store.VM {
	f.t.Helper()
	v, err := f.st.GetVM(context.Background(), id)
	if err != nil {
		f.t.Fatal(err)
	}
	return v
}

// left lists what a failed boot must not leave in the VM's folder.
func (f *vmFixture) left() []string {
	var out []string
	for _, name := range []string{"disk.fake", APISocket, filepath.Base(network.SocketPath(f.dir))} {
		if _, err := os.Lstat(filepath.Join(f.dir, name)); err == nil {
			out = append(out, name)
		}
	}
	return out
}

// TestBoot: a boot runs its steps to a running VM, recorded so, whose API
// socket is served; a stop ends the machine and removes the socket.
func TestBoot(t *testing.T) {
	drv := &fake.Driver{}
	f := newFixture(t, drv).withNetwork()
	s, id, err := f.start()
	if err != nil {
		t.Fatal(err)
	}
	if v := f.state(id); v.State != "running" || v.HypervisorPID != os.Getpid() {
		t.Errorf("recorded %s (pid %d), want running", v.State, v.HypervisorPID)
	}
	if _, err := os.Stat(filepath.Join(f.dir, APISocket)); err != nil {
		t.Errorf("API socket: %v", err)
	}
	if tm := s.Timings(); tm.Launch <= 0 || tm.FirstCommand <= 0 || tm.CreateToFirstCommand < tm.Launch+tm.FirstCommand {
		t.Errorf("timings %+v: a phase is missing", tm)
	}
	ms := drv.Machines()
	if len(ms) != 1 || ms[0].Config().Net[0].StreamSocket != network.SocketPath(f.dir) {
		t.Fatalf("machines %v: want one, its NIC on the network's socket", ms)
	}
	if err := s.Stop(context.Background(), true, 0); err != nil {
		t.Fatal(err)
	}
	if ms[0].Kills() == 0 {
		t.Error("the machine was not killed")
	}
	if v := f.state(id); v.State != "stopped" {
		t.Errorf("recorded %s after a stop", v.State)
	}
	if left := f.left(); len(left) > 0 {
		t.Errorf("a stopped VM left %v", left)
	}
}

// TestBootFailureUndone: a boot that fails at any step undoes the steps
// before it (the machine killed, the network closed, the overlay made for
// a clone removed), records the VM failed with the reason, and returns the
// step's error.
func TestBootFailureUndone(t *testing.T) {
	boom := errors.New("boom")
	for _, c := range []struct {
		step    string
		fail    func(f *vmFixture)
		machine bool // the machine was made
		want    string
	}{
		{"disks", func(f *vmFixture) {
			f.drv.OverlayFunc = func(context.Context, string, string) error { return boom }
		}, false, "boom"},
		{"hypervisor", func(f *vmFixture) {
			f.drv.PrelaunchFunc = func(context.Context, *hypervisor.MachineConfig) (hypervisor.Machine, error) { return nil, boom }
		}, false, "launch: boom"},
		{"restore", func(f *vmFixture) {
			f.drv.NewMachine = func(cfg *hypervisor.MachineConfig) *fake.Machine {
				m := fake.NewMachine(cfg)
				m.RestoreFunc = func(context.Context, string) error { return boom }
				return m
			}
		}, true, "launch: restore snapshot: boom"},
		{"ready", func(f *vmFixture) {
			f.drv.NewMachine = func(cfg *hypervisor.MachineConfig) *fake.Machine {
				m := fake.NewMachine(cfg)
				m.DialFastFunc = func(context.Context) (net.Conn, error) {
					m.Exit(boom) // the hypervisor dies as the guest boots
					return nil, boom
				}
				return m
			}
		}, true, "guest died during boot: boom"},
		{"silent", func(f *vmFixture) {
			f.spec.BootTimeout = 200 * time.Millisecond
			f.drv.NewMachine = func(cfg *hypervisor.MachineConfig) *fake.Machine {
				m := fake.NewMachine(cfg)
				m.DialFastFunc = func(context.Context) (net.Conn, error) {
					host, _ := net.Pipe() // a guest that never reads nor answers
					return host, nil
				}
				return m
			}
		}, true, "guest agent did not answer within 200ms (raise the boot timeout if the host is slow)\nguest: the hypervisor cannot describe it"},
		{"serve", func(f *vmFixture) {
			// Something in the way of the API socket.
			if err := os.MkdirAll(filepath.Join(f.dir, APISocket, "x"), 0o700); err != nil {
				t.Fatal(err)
			}
		}, true, "serve API socket"},
	} {
		t.Run(c.step, func(t *testing.T) {
			drv := &fake.Driver{}
			f := newFixture(t, drv).withDisk().restored().withNetwork()
			c.fail(f)
			_, id, err := f.start()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Start: %v, want an error with %q", err, c.want)
			}
			if ms := drv.Machines(); c.machine && (len(ms) != 1 || ms[0].Kills() == 0) {
				t.Errorf("machines %v: want one, killed", ms)
			}
			if v := f.state(id); v.State != "failed" || !strings.Contains(v.Reason, c.want) {
				t.Errorf("recorded %s (%s), want failed with the reason", v.State, v.Reason)
			}
			if c.step == "serve" {
				_ = os.RemoveAll(filepath.Join(f.dir, APISocket)) // ours
			}
			if left := f.left(); len(left) > 0 {
				t.Errorf("a failed boot left %v", left)
			}
		})
	}
}

// TestUndoErrorsJoined: the undos run last first, and their errors join
// the step's.
func TestUndoErrorsJoined(t *testing.T) {
	boom, undo1, undo2 := errors.New("boom"), errors.New("undo one"), errors.New("undo two")
	var order []string
	s := &Supervisor{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ok := func(context.Context) error { return nil }
	err := s.runSteps(context.Background(), []step{
		{"p", "one", ok, func() error { order = append(order, "one"); return undo1 }},
		{"p", "two", ok, nil},
		{"p", "three", ok, func() error { order = append(order, "three"); return undo2 }},
		{"p", "four", func(context.Context) error { return boom }, func() error { order = append(order, "four"); return nil }},
	})
	if !errors.Is(err, boom) || !errors.Is(err, undo1) || !errors.Is(err, undo2) {
		t.Errorf("error %v: want the step's and both undos'", err)
	}
	if strings.Join(order, ",") != "three,one" {
		t.Errorf("undos ran %v, want three,one (the failed step's own undo does not run)", order)
	}
}

// TestRestore: a clone gets an overlay on the snapshot's frozen disk and
// restores into a machine launched ahead of the snapshot, its fast lane
// connected first; without Prelaunch the driver's Start restores, and the
// lane follows. A clone started again boots from its own disk.
func TestRestore(t *testing.T) {
	t.Run("Prelaunch", func(t *testing.T) {
		drv := &fake.Driver{}
		f := newFixture(t, drv).withDisk().restored()
		var started bool
		drv.StartFunc = func(context.Context, *hypervisor.MachineConfig) (hypervisor.Machine, error) {
			started = true
			return nil, errors.New("start called")
		}
		s, _, err := f.start()
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(f.dir, "disk.fake"))
		if err != nil || string(b) != "overlay of "+fake.Layout.Disk(f.snap, 0) {
			t.Errorf("overlay %q (%v), want one on the frozen disk", b, err)
		}
		if started || !s.LaneDialedEarly() {
			t.Errorf("Start called %v, lane dialed early %v: want a prelaunch, its lane dialed before the restore", started, s.LaneDialedEarly())
		}
	})
	t.Run("Start", func(t *testing.T) {
		caps := fake.Capabilities()
		caps.Prelaunch = false
		drv := &fake.Driver{Caps: &caps}
		s, _, err := newFixture(t, drv).restored().start()
		if err != nil {
			t.Fatal(err)
		}
		if ms := drv.Machines(); len(ms) != 1 || ms[0].Config().Restore == nil || s.LaneDialedEarly() {
			t.Errorf("machines %v: want one restored by Start, its lane dialed after", ms)
		}
	})
	t.Run("AgainFromItsDisk", func(t *testing.T) {
		drv := &fake.Driver{}
		f := newFixture(t, drv).withDisk().restored()
		if err := os.WriteFile(filepath.Join(f.dir, "disk.fake"), []byte("moved on"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, _, err := f.start(); err != nil {
			t.Fatal(err)
		}
		ms := drv.Machines()
		if len(ms) != 1 || ms[0].Config().Restore != nil || !strings.Contains(ms[0].Config().Cmdline, "smolvm.hostname=") && ms[0].Config().Cmdline != "" {
			t.Errorf("machines %v: want one booted, not restored", ms)
		}
		if b, _ := os.ReadFile(filepath.Join(f.dir, "disk.fake")); string(b) != "moved on" {
			t.Errorf("the VM's own disk was replaced: %q", b)
		}
	})
	t.Run("Unsupported", func(t *testing.T) {
		caps := fake.Capabilities()
		caps.Snapshot, caps.Prelaunch = false, false
		_, _, err := newFixture(t, &fake.Driver{Caps: &caps}).restored().start()
		if !errors.Is(err, errdefs.ErrUnsupported) {
			t.Errorf("a restore by a driver without snapshots: %v, want ErrUnsupported", err)
		}
	})
}

// TestPause: pause and resume reach the machine and the store; a driver
// without the capability makes them ErrUnsupported.
func TestPause(t *testing.T) {
	drv := &fake.Driver{}
	f := newFixture(t, drv)
	s, id, err := f.start()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.setPaused(ctx, true); err != nil {
		t.Fatal(err)
	}
	m := drv.Machines()[0]
	if !m.Paused() || !s.Paused() || f.state(id).State != store.StatePaused {
		t.Errorf("after pause: machine paused %v, supervisor %v, recorded %s", m.Paused(), s.Paused(), f.state(id).State)
	}
	if err := s.Snapshot(ctx, t.TempDir(), SnapshotOptions{}); !errors.Is(err, errdefs.ErrNotRunning) {
		t.Errorf("a snapshot while paused: %v, want ErrNotRunning", err)
	}
	if err := s.setPaused(ctx, false); err != nil {
		t.Fatal(err)
	}
	if m.Paused() || f.state(id).State != store.StateRunning {
		t.Errorf("after resume: machine paused %v, recorded %s", m.Paused(), f.state(id).State)
	}

	caps := fake.Capabilities()
	caps.Pause, caps.Snapshot, caps.Prelaunch = false, false, false
	s, _, err = newFixture(t, &fake.Driver{Caps: &caps}).start()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.setPaused(ctx, true); !errors.Is(err, errdefs.ErrUnsupported) {
		t.Errorf("pause by a driver without it: %v, want ErrUnsupported", err)
	}
	if err := s.Snapshot(ctx, t.TempDir(), SnapshotOptions{}); !errors.Is(err, errdefs.ErrUnsupported) {
		t.Errorf("snapshot by a driver without it: %v, want ErrUnsupported", err)
	}
}

// TestSnapshot: a snapshot holds the spec, the driver's state and the
// frozen overlay, finished; the VM goes on. A failed one lets the machine
// run again.
func TestSnapshot(t *testing.T) {
	drv := &fake.Driver{}
	f := newFixture(t, drv).withDisk()
	if err := os.WriteFile(filepath.Join(f.dir, "disk.fake"), []byte("written"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, _, err := f.start()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "snap")
	if err := s.Snapshot(ctx, dir, SnapshotOptions{Resume: true}); err != nil {
		t.Fatal(err)
	}
	m := drv.Machines()[0]
	if m.Paused() {
		t.Error("the machine stayed paused")
	}
	for _, p := range []string{filepath.Join(dir, SnapshotSpec), fake.Layout.StatePath(dir)} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("snapshot file: %v", err)
		}
	}
	frozen := fake.Layout.Disk(dir, 0)
	if b, err := os.ReadFile(frozen); err != nil || string(b) != "written" {
		t.Errorf("frozen disk %q (%v)", b, err)
	}
	if fi, err := os.Stat(frozen); err != nil || fi.Mode().Perm() != 0o400 {
		t.Errorf("frozen disk not finished (read-only): %v", err)
	}

	m.SnapshotFunc = func(context.Context, string, bool) error { return errors.New("disk full") }
	if err := s.Snapshot(ctx, filepath.Join(t.TempDir(), "snap"), SnapshotOptions{Resume: true}); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("a failed snapshot: %v", err)
	}
	if m.Paused() {
		t.Error("a failed snapshot left the machine paused")
	}
}

// TestWarmUp: a restored VM runs `true` once over its fast lane soon after
// it answered, unless a command started first; a booted VM does not.
func TestWarmUp(t *testing.T) {
	var fire []func()
	old := afterFunc
	afterFunc = func(_ time.Duration, f func()) { fire = append(fire, f) }
	t.Cleanup(func() { afterFunc = old })
	ctx := context.Background()
	run := func(s *Supervisor) {
		t.Helper()
		l, err := s.Lane(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := warmUp(ctx, l); err != nil { // the same call a caller's run makes
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name     string
		restored bool
		command  bool // a caller's command before the warm-up's time
		want     int  // runs of `true`
	}{
		{"Restored", true, false, 1},
		{"CommandFirst", true, true, 1},
		{"Booted", false, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fire = nil
			drv := &fake.Driver{}
			f := newFixture(t, drv)
			if tc.restored {
				f.restored()
			}
			s, _, err := f.start()
			if err != nil {
				t.Fatal(err)
			}
			if tc.restored != (len(fire) == 1) {
				t.Fatalf("%d warm-ups scheduled, restored %v", len(fire), tc.restored)
			}
			if tc.command {
				run(s)
			}
			for _, f := range fire {
				f()
			}
			ms := drv.Machines()
			if len(ms) != 1 {
				t.Fatalf("%d machines", len(ms))
			}
			runs := ms[0].Runs()
			if len(runs) != tc.want {
				t.Fatalf("runs %q, want %d", runs, tc.want)
			}
			for _, r := range runs {
				if len(r) != 1 || r[0] != "true" {
					t.Errorf("run %q, want [true]", r)
				}
			}
		})
	}
}
