// Package hypervistest holds every hypervisor driver to the contract of
// package hypervisor: Contract is a test any driver must pass, run against
// each driver's machines (a real boot for a real driver).
package hypervistest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// Fixture is what a driver's machines need to boot on this host.
type Fixture struct {
	// Machine is a bootable machine in the state folder dir (its kernel,
	// initramfs and command line; the contract sets the rest).
	Machine func(t *testing.T, dir string) *hypervisor.MachineConfig
	// BaseDisk makes a disk in the driver's OverlayFormat at path, for
	// the disk calls (nil: they are not tested).
	BaseDisk func(t *testing.T, path string)
	// BootTimeout bounds the wait for a guest agent (default 2 minutes).
	BootTimeout time.Duration
}

// Contract tests driver d: its capabilities are consistent, a machine
// boots to an answering agent and ends on Kill, and every power is there
// exactly when the capabilities say so (ErrUnsupported otherwise): pause,
// snapshot and restore (into a started and into a prelaunched machine),
// the disk calls.
func Contract(t *testing.T, d hypervisor.Driver, fx Fixture) {
	caps := d.Capabilities()
	if fx.BootTimeout == 0 {
		fx.BootTimeout = 2 * time.Minute
	}
	t.Run("Capabilities", func(t *testing.T) { checkCapabilities(t, d, caps) })
	t.Run("Invalid", func(t *testing.T) {
		_, err := d.Start(context.Background(), &hypervisor.MachineConfig{VCPUs: 1, MemoryMiB: 256})
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("Start without a state folder: %v, want ErrInvalid", err)
		}
	})
	t.Run("Lifecycle", func(t *testing.T) {
		m := start(t, d, fx, fx.Machine(t, shortDir(t)))
		if m.PID() <= 0 {
			t.Errorf("PID %d", m.PID())
		}
		if info := m.Info(); info.Driver == "" {
			t.Errorf("Info %+v names no driver", info)
		}
		select {
		case <-m.Done():
			t.Fatalf("a started machine is done: %v", m.Err())
		default:
		}
		ping(t, m, fx.BootTimeout)
		if err := m.Kill(); err != nil {
			t.Errorf("Kill: %v", err)
		}
		select {
		case <-m.Done():
		default:
			t.Error("Kill returned before the machine was done")
		}
		if err := m.Kill(); err != nil {
			t.Errorf("a second Kill: %v", err)
		}
	})
	t.Run("Pause", func(t *testing.T) {
		m := start(t, d, fx, fx.Machine(t, shortDir(t)))
		if !caps.Pause {
			for name, call := range map[string]func(context.Context) error{"Pause": m.Pause, "Resume": m.Resume} {
				if err := call(context.Background()); !errors.Is(err, errdefs.ErrUnsupported) {
					t.Errorf("%s without the capability: %v, want ErrUnsupported", name, err)
				}
			}
			return
		}
		c := ping(t, m, fx.BootTimeout)
		if err := m.Pause(context.Background()); err != nil {
			t.Fatalf("Pause: %v", err)
		}
		inspect(t, m, "run state paused")
		if err := m.Resume(context.Background()); err != nil {
			t.Fatalf("Resume: %v", err)
		}
		pingOn(t, c, fx.BootTimeout)
		inspect(t, m, "run state running", "vCPU 0 ")
	})
	t.Run("Snapshot", func(t *testing.T) { snapshot(t, d, fx, caps) })
	t.Run("Disks", func(t *testing.T) { disks(t, d, fx, caps) })
}

func checkCapabilities(t *testing.T, d hypervisor.Driver, caps hypervisor.Capabilities) {
	if len(caps.Accels) == 0 || len(caps.Channels) == 0 || len(caps.DiskFormats) == 0 {
		t.Errorf("capabilities name no accelerator, channel or disk format: %+v", caps)
	}
	if caps.Snapshot && !caps.Pause {
		t.Error("Snapshot without Pause: a saved machine is paused, and resumed to go on")
	}
	if caps.Prelaunch && !caps.Snapshot {
		t.Error("Prelaunch without Snapshot: a prelaunched machine waits for a snapshot")
	}
	if caps.OverlayFormat != "" && !slices.Contains(caps.DiskFormats, caps.OverlayFormat) {
		t.Errorf("overlay format %q is not among the disk formats %v", caps.OverlayFormat, caps.DiskFormats)
	}
	if caps.Snapshot {
		l := d.SnapshotLayout()
		names := []string{l.State, l.DiskPattern}
		if caps.MemoryFile {
			names = append(names, l.Memory)
		}
		for _, n := range names {
			if n == "" || strings.Contains(n, "/") {
				t.Errorf("snapshot layout %+v: a name is empty or not a file name", l)
			}
		}
		if strings.Count(l.DiskPattern, "%d") != 1 || l.Disk("/s", 3) == l.Disk("/s", 4) {
			t.Errorf("snapshot layout %+v: the disk pattern does not number disks", l)
		}
		if l.State == l.Memory || slices.Contains(l.Disks("/s"), l.StatePath("/s")) {
			t.Errorf("snapshot layout %+v: two files share a name", l)
		}
	}
	if d.CacheKey() == "" {
		t.Error("CacheKey is empty")
	}
}

// snapshot saves a running machine and restores it: into a started machine
// and, with Prelaunch, into a prelaunched one.
func snapshot(t *testing.T, d hypervisor.Driver, fx Fixture, caps hypervisor.Capabilities) {
	ctx := context.Background()
	dir := shortDir(t)
	mc := fx.Machine(t, dir)
	if caps.MemoryFile {
		mc.MemoryFile = filepath.Join(dir, "guest-ram")
	}
	m := start(t, d, fx, mc)
	snap := filepath.Join(shortDir(t), "snap")
	if err := os.Mkdir(snap, 0o700); err != nil {
		t.Fatal(err)
	}
	if !caps.Snapshot {
		if err := m.Snapshot(ctx, snap, false); !errors.Is(err, errdefs.ErrUnsupported) {
			t.Errorf("Snapshot without the capability: %v, want ErrUnsupported", err)
		}
		if _, err := d.Prelaunch(ctx, restoreOf(fx.Machine(t, shortDir(t)), snap)); !errors.Is(err, errdefs.ErrUnsupported) {
			t.Errorf("Prelaunch without the capability: %v, want ErrUnsupported", err)
		}
		return
	}
	c := ping(t, m, fx.BootTimeout)
	if err := m.Snapshot(ctx, snap, false); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	l := d.SnapshotLayout()
	want := []string{l.StatePath(snap)}
	if caps.MemoryFile {
		want = append(want, l.MemoryPath(snap))
	}
	for _, f := range want {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("the snapshot lacks a file of its layout: %v", err)
		}
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatalf("Resume after Snapshot: %v", err)
	}
	pingOn(t, c, fx.BootTimeout)
	_ = m.Kill()

	t.Run("Start", func(t *testing.T) {
		r := start(t, d, fx, restoreOf(fx.Machine(t, shortDir(t)), snap))
		ping(t, r, fx.BootTimeout)
	})
	t.Run("Prelaunch", func(t *testing.T) {
		rc := restoreOf(fx.Machine(t, shortDir(t)), snap)
		p, err := d.Prelaunch(ctx, rc)
		if !caps.Prelaunch {
			if !errors.Is(err, errdefs.ErrUnsupported) {
				t.Errorf("Prelaunch without the capability: %v, want ErrUnsupported", err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Prelaunch: %v", err)
		}
		t.Cleanup(func() { _ = p.Kill() })
		// Claimed as a spare is: its folder renamed, before the restore.
		moved := filepath.Join(shortDir(t), "vm")
		if err := os.Rename(rc.Dir, moved); err != nil {
			t.Fatal(err)
		}
		p.Move(moved, 0)
		if err := p.Restore(ctx, moved); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		ping(t, p, fx.BootTimeout)
	})
}

// disks runs the disk calls: an overlay on a frozen disk, frozen again and
// finished read-only.
func disks(t *testing.T, d hypervisor.Driver, fx Fixture, caps hypervisor.Capabilities) {
	if caps.OverlayFormat == "" || fx.BaseDisk == nil {
		t.Skip("the driver makes no overlays, or the fixture no base disk")
	}
	ctx := context.Background()
	dir := t.TempDir()
	base, overlay := filepath.Join(dir, "base"), filepath.Join(dir, "overlay")
	fx.BaseDisk(t, base)
	if err := d.Overlay(ctx, base, overlay); err != nil {
		t.Fatalf("Overlay: %v", err)
	}
	snaps := filepath.Join(dir, "snapshots")
	snap := filepath.Join(snaps, "s")
	if err := os.MkdirAll(snap, 0o700); err != nil {
		t.Fatal(err)
	}
	frozen := d.SnapshotLayout().Disk(snap, 0)
	if err := d.FreezeDisk(ctx, overlay, frozen); err != nil {
		t.Fatalf("FreezeDisk: %v", err)
	}
	if err := d.FinishDisk(ctx, frozen, snaps); err != nil {
		t.Fatalf("FinishDisk: %v", err)
	}
	if fi, err := os.Stat(frozen); err != nil || fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("a finished disk: %v, mode %v; want it read-only", err, fi.Mode())
	}
	if got := d.SnapshotLayout().Disks(snap); !slices.Equal(got, []string{frozen}) {
		t.Errorf("the layout lists the frozen disks %v, want %v", got, []string{frozen})
	}
	// A clone's overlay on the frozen disk.
	if err := d.Overlay(ctx, frozen, filepath.Join(dir, "clone")); err != nil {
		t.Errorf("Overlay on a frozen disk: %v", err)
	}
}

// restoreOf is mc, restoring the snapshot in snap.
func restoreOf(mc *hypervisor.MachineConfig, snap string) *hypervisor.MachineConfig {
	mc.Restore, mc.MemoryFile = &hypervisor.Restore{Dir: snap}, ""
	return mc
}

// start starts a machine that the test kills at its end.
func start(t *testing.T, d hypervisor.Driver, fx Fixture, mc *hypervisor.MachineConfig) hypervisor.Machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), fx.BootTimeout)
	defer cancel()
	m, err := d.Start(ctx, mc)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = m.Kill() })
	return m
}

// ping waits for the machine's agent to answer a ping on a new fast lane,
// which it returns.
func ping(t *testing.T, m hypervisor.Machine, timeout time.Duration) *lane.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		select {
		case <-m.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		conn, err := m.DialFast(ctx)
		if err == nil {
			c := lane.NewClient(conn)
			t.Cleanup(func() { _ = c.Close() })
			if err = c.Unary(ctx, lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{}); err == nil {
				return c
			}
			_ = c.Close()
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the agent did not answer a ping: %v (machine done: %v)", err, isDone(m))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// pingOn pings over a lane that is connected.
func pingOn(t *testing.T, c *lane.Client, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := c.Unary(ctx, lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{}); err != nil {
		t.Fatalf("ping: %v", err)
	}
}

func isDone(m hypervisor.Machine) bool {
	select {
	case <-m.Done():
		return true
	default:
		return false
	}
}

// shortDir is a new folder with a short path: unix socket paths in it
// must stay under 108 bytes.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "hvt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// inspect checks that a machine that can describe its guest
// (hypervisor.Inspector) names its process and says each of want.
func inspect(t *testing.T, m hypervisor.Machine, want ...string) {
	t.Helper()
	in, ok := m.(hypervisor.Inspector)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got := in.Inspect(ctx)
	for _, w := range append(want, fmt.Sprintf("pid %d ", m.PID()), "threads [") {
		if !strings.Contains(got, w) {
			t.Errorf("Inspect = %q, want it to say %q", got, w)
		}
	}
}
