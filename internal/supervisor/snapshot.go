package supervisor

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/wire"
)

// SnapshotSpec is the file in a snapshot folder that says how to start a
// machine from it: the machine must be built exactly like the saved one.
const SnapshotSpec = "spec.json"

// SnapshotOptions tune Snapshot.
type SnapshotOptions struct {
	// Resume lets the machine run on afterwards.
	Resume bool
	// KeepLane leaves the fast lane connected in the saved guest, for a
	// machine nothing else calls while it is saved (the warm snapshot's):
	// a restore that connects its lane before the guest resumes then
	// finds the agent reading it, with no hang-up and new connection to
	// go through first (each a path the emulator translates anew). A
	// lane in use is hung up, so that no clone answers calls that were
	// in flight in the source.
	KeepLane bool
}

// Snapshot saves the running machine into dir (memory and device state,
// the spec, and a frozen copy of each disk the VM writes to). The agent
// connection is dropped first, so the saved guest waits for a new host;
// with opts.Resume the VM goes on afterwards on a new connection,
// otherwise it stays paused.
//
// Disks. A snapshot must hold each writable disk exactly as the saved
// memory knows it. The VM's isolated disk is an overlay in its folder that
// holds only what the VM changed on top of the read-only image: while the
// machine is paused after saving its state, the driver copies it into the
// snapshot (FreezeDisk), and once the machine runs again makes the copy
// depend on the image alone (FinishDisk; the QEMU driver's disk.go tells
// how and why this is consistent). Each VM restored from the snapshot gets
// an overlay of its own on the frozen copy (see prepareDisks), so clones
// share the snapshot's disk copy-on-write and never see each other's
// writes. A read-only (shared mode) disk is kept by reference: the image
// itself. Other writable disks (a raw file of the caller's) are refused:
// freezing them would mean a full copy.
func (s *Supervisor) Snapshot(ctx context.Context, dir string, opts SnapshotOptions) error {
	if !s.caps.Snapshot {
		return fmt.Errorf("snapshot: %w", hypervisor.ErrUnsupported)
	}
	if s.Paused() {
		return s.errPaused()
	}
	frozen, err := s.frozenDisks()
	if err != nil {
		return err
	}
	if len(s.spec.Machine.Mounts) > 0 {
		// QEMU 7.2 cannot migrate a vhost-user-fs device.
		return fmt.Errorf("snapshots of VMs with host folders (virtiofs devices cannot be saved): %w", hypervisor.ErrUnsupported)
	}
	if s.tapNetwork() != nil {
		// A clone would come up with this VM's leased address and TAP.
		return fmt.Errorf("snapshots of VMs in network mode tap (the guest's address is leased to this VM; use --net user): %w", hypervisor.ErrUnsupported)
	}
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create snapshot folder: %w", err)
	}
	b, err := json.MarshalIndent(s.spec, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, SnapshotSpec), b, 0o600); err != nil {
		return fmt.Errorf("write snapshot spec: %w", err)
	}
	// Hang up on the agent and give the guest a moment to see it, so the
	// saved agent is waiting for a new connection, not inside the old one.
	s.mu.Lock()
	old := s.agentConn
	s.mu.Unlock()
	_ = old.Close()
	if !opts.KeepLane {
		s.fast.hangUp()
	}
	time.Sleep(50 * time.Millisecond)
	layout := s.drv.SnapshotLayout()
	t0 := time.Now()
	err = s.machine.Snapshot(ctx, dir, !opts.Resume)
	t1 := time.Now()
	if err == nil {
		// Still paused: the disks cannot change under the copy.
		for _, i := range frozen {
			if err = s.drv.FreezeDisk(ctx, s.spec.Machine.Disks[i].Path, layout.Disk(dir, i)); err != nil {
				break
			}
		}
	}
	t2 := time.Now()
	if err != nil {
		// The machine is paused (Snapshot stops it first): let it go on.
		_ = s.machine.Resume(context.WithoutCancel(ctx))
		_ = s.reconnect(context.WithoutCancel(ctx))
		return fmt.Errorf("snapshot: %w", err)
	}
	if opts.Resume {
		if err := s.machine.Resume(ctx); err != nil {
			return err
		}
	}
	t3 := time.Now()
	// The source runs again; what is left is off its pause.
	for _, i := range frozen {
		if err := s.drv.FinishDisk(ctx, layout.Disk(dir, i), filepath.Dir(filepath.Clean(dir))); err != nil {
			if opts.Resume {
				_ = s.reconnect(context.WithoutCancel(ctx))
			}
			return fmt.Errorf("snapshot: %w", err)
		}
	}
	s.log.Debug("snapshot saved", "dir", dir, "memory", t1.Sub(t0), "disk_copy", t2.Sub(t1), "resume", t3.Sub(t2), "disk_finish", time.Since(t3))
	if !opts.Resume {
		return nil
	}
	return s.reconnect(ctx)
}

// frozenDisks lists the disks a snapshot of this VM copies (the
// overlays in its folder, in the driver's overlay format) and refuses the
// disks it cannot take.
func (s *Supervisor) frozenDisks() ([]int, error) {
	var out []int
	for i, d := range s.spec.Machine.Disks {
		switch {
		case d.ReadOnly:
		case d.Format == s.caps.OverlayFormat && d.Format != "" && filepath.Dir(d.Path) == filepath.Clean(s.spec.Machine.Dir):
			out = append(out, i)
		default:
			return nil, fmt.Errorf("snapshots of VMs with a writable disk of the caller's (%s) would copy the whole disk: %w; boot the VM from a disk image instead (Config.Image, --image) in isolated or shared mode", d.Path, hypervisor.ErrUnsupported)
		}
	}
	return out, nil
}

// prepareDisks gives a machine started from a snapshot its disks: a fresh
// overlay in the VM's folder on each frozen disk of the snapshot (the
// machine's drives stay as they were saved: same order, same ids), made by
// the driver in its format. A restored VM that ran before (stopped, now
// started again) already has its overlay, which has moved on from the
// snapshot's memory: restoring that memory over it would corrupt the
// guest's file system, so the VM boots from its own disk instead, as a
// stopped VM of a disk image does.
func (s *Supervisor) prepareDisks(ctx context.Context, b *boot) error {
	mc := &b.mc
	if mc.Restore == nil {
		return nil
	}
	var overlays []int
	for i, d := range mc.Disks {
		if d.ReadOnly {
			continue
		}
		if _, err := os.Stat(d.Path); err == nil {
			mc.Restore, s.spec.Restored = nil, false
			mc.Cmdline = withHostname(mc.Cmdline, s.spec.Hostname)
			s.log.Debug("restored VM started again: booting from its own disk", "disk", d.Path)
			return nil
		}
		overlays = append(overlays, i)
	}
	layout := s.drv.SnapshotLayout()
	for _, i := range overlays {
		if err := s.drv.Overlay(ctx, layout.Disk(mc.Restore.Dir, i), mc.Disks[i].Path); err != nil {
			return err
		}
		b.overlays = append(b.overlays, mc.Disks[i].Path)
	}
	return nil
}

// withHostname sets the hostname option (wire.ParamHostname) on a kernel
// command line.
func withHostname(cmdline, hostname string) string {
	if hostname == "" {
		return cmdline
	}
	f := strings.Fields(cmdline)
	for i := range f {
		if strings.HasPrefix(f[i], wire.ParamHostname+"=") {
			f[i] = wire.ParamHostname + "=" + hostname
		}
	}
	return strings.Join(f, " ")
}

// reconnect makes the agent's gRPC client again (it connects on first
// use, as at start) and waits until the agent answers on the fast lane.
func (s *Supervisor) reconnect(ctx context.Context) error {
	conn, err := DialAgent(s.machine)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.agentConn = conn
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return s.callLane(ctx, lane.TypePing, &agentpb.PingRequest{}, &agentpb.PingResponse{})
}

func (c *control) Snapshot(ctx context.Context, req *controlpb.SnapshotRequest) (*controlpb.SnapshotResponse, error) {
	if req.Dir == "" || !filepath.IsAbs(req.Dir) {
		return nil, fmt.Errorf("%w: snapshot folder must be an absolute path", errdefs.ErrInvalid)
	}
	if err := c.s.Snapshot(ctx, req.Dir, SnapshotOptions{Resume: req.Resume}); err != nil {
		return nil, err
	}
	fi, err := os.Stat(c.s.drv.SnapshotLayout().StatePath(req.Dir))
	if err != nil {
		return nil, err
	}
	return &controlpb.SnapshotResponse{MemoryBytes: fi.Size()}, nil
}

// SnapshotLayout names the files of a snapshot of this spec's machine:
// its driver's.
func (s *Spec) SnapshotLayout() (hypervisor.SnapshotLayout, error) {
	d, err := hypervisor.Get(s.Driver)
	if err != nil {
		return hypervisor.SnapshotLayout{}, err
	}
	return d.SnapshotLayout(), nil
}
