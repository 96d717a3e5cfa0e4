package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
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
// Disks. A snapshot must hold the disk exactly as the saved memory knows
// it: the guest's page cache, its file system's in-memory state and
// virtio-blk's device state all refer to it. The VM's isolated disk is a
// qcow2 overlay in its folder that holds only what the VM changed on top
// of the read-only image, so freezing it is cheap: while the machine is
// paused at the end of the migration, the overlay is copied into the
// snapshot folder (sparse, and as a reflink where the file system can;
// a few MB for a freshly booted guest). The copy is consistent without
// asking the guest to sync: stopping the machine drains its I/O, and the
// end of the migration inactivates the images, which writes QEMU's qcow2
// metadata caches out to the file even with cache=unsafe (dirty pages
// still in the guest's page cache are part of the saved memory). The
// copy keeps the overlay's absolute backing path, the image, which stays
// read-only; `cont` re-activates the source's images and it goes on
// writing to its own overlay. Each VM restored from the snapshot gets an
// overlay of its own whose backing file is the frozen copy (see
// prepareDisks), so clones share the snapshot's disk copy-on-write and
// never see each other's writes. A read-only (shared mode) disk is kept
// by reference: the image itself. Other writable disks (a raw file of the
// caller's) are refused: freezing them would mean a full copy.
func (s *Supervisor) Snapshot(ctx context.Context, dir string, opts SnapshotOptions) error {
	sn, ok := s.machine.(hypervisor.Snapshotter)
	if !ok {
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
	t0 := time.Now()
	err = sn.Snapshot(ctx, dir)
	if mc := s.spec.Machine; err == nil && mc.MemoryShared && mc.MemoryFile != "" {
		// The migration stream left the memory file out: it is the
		// snapshot's memory as it stands (paused).
		err = saveMemory(ctx, mc.MemoryFile, filepath.Join(dir, hypervisor.SnapshotRAM), !opts.Resume)
	}
	t1 := time.Now()
	if err == nil {
		// Still paused: the disks cannot change under the copy.
		for _, i := range frozen {
			if err = copyDisk(ctx, s.spec.Machine.Disks[i].Path, SnapshotDisk(dir, i)); err != nil {
				break
			}
		}
	}
	t2 := time.Now()
	if err != nil {
		// The machine is paused (Snapshot stops it first): let it go on.
		_ = s.machine.(hypervisor.Pauser).Resume(context.WithoutCancel(ctx))
		_ = s.reconnect(context.WithoutCancel(ctx))
		return fmt.Errorf("snapshot: %w", err)
	}
	if opts.Resume {
		if err := s.machine.(hypervisor.Pauser).Resume(ctx); err != nil {
			return err
		}
	}
	t3 := time.Now()
	// The source runs again; what is left is off its pause.
	for _, i := range frozen {
		if err := finishDisk(ctx, SnapshotDisk(dir, i), filepath.Dir(filepath.Clean(dir))); err != nil {
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

// saveMemory puts a paused machine's memory file into a snapshot: a hard
// link when the machine will not run again (nothing writes to it any
// more), a copy otherwise. Blocks of zeros (the guest's free memory) are
// then punched out, so the file takes disk space only for memory in use
// and clones read the rest as holes.
func saveMemory(ctx context.Context, src, dst string, link bool) error {
	if !link || os.Link(src, dst) != nil {
		if err := copyDisk(ctx, src, dst); err != nil {
			return fmt.Errorf("save memory: %w", err)
		}
	}
	if err := punchZeros(dst); err != nil {
		return fmt.Errorf("save memory: %w", err)
	}
	// Not read-only: QEMU 7.2 opens a private memory file for writing,
	// although a private mapping never writes to it.
	return os.Chmod(dst, 0o600)
}

// punchZeros deallocates the 4 KiB blocks of a file that hold only zeros;
// its size and contents stay the same. On a file system that cannot seek
// to data or punch holes the file is left whole: that costs disk space,
// nothing else.
func punchZeros(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	const block = 4 << 10
	fd := int(f.Fd())
	buf, zero := make([]byte, 1<<20), make([]byte, block)
	var runStart, runEnd int64 // the pending run of zero blocks
	flush := func() error {
		if runEnd > runStart {
			err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, runStart, runEnd-runStart)
			if errors.Is(err, unix.EOPNOTSUPP) {
				return errNoPunch
			}
			if err != nil {
				return fmt.Errorf("punch holes in %s: %w", path, err)
			}
		}
		runStart, runEnd = 0, 0
		return nil
	}
	for off := int64(0); off < fi.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return nil // no SEEK_DATA here: the file stays as it is (only larger)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek %s: %w", path, err)
		}
		for pos := data; pos < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 {
				return fmt.Errorf("read %s: %w", path, err)
			}
			for i := 0; i+block <= n; i += block {
				at := pos + int64(i)
				if !bytes.Equal(buf[i:i+block], zero) {
					continue
				}
				if at != runEnd {
					if err := flush(); errors.Is(err, errNoPunch) {
						return nil // the file stays as it is
					} else if err != nil {
						return err
					}
					runStart = at
				}
				runEnd = at + block
			}
			pos += int64(n)
		}
		off = hole
	}
	if err := flush(); !errors.Is(err, errNoPunch) {
		return err
	}
	return nil // the file stays as it is
}

// errNoPunch: the file system cannot punch holes; the file stays whole.
var errNoPunch = errors.New("hole punching not supported")

// SnapshotDisk is the frozen copy of the machine's disk i in a snapshot
// folder.
func SnapshotDisk(dir string, i int) string {
	return filepath.Join(dir, fmt.Sprintf("disk%d.qcow2", i))
}

// frozenDisks lists the disks a snapshot of this VM copies (its qcow2
// overlays) and refuses the disks it cannot take.
func (s *Supervisor) frozenDisks() ([]int, error) {
	var out []int
	for i, d := range s.spec.Machine.Disks {
		switch {
		case d.ReadOnly:
		case d.Format == "qcow2" && filepath.Dir(d.Path) == filepath.Clean(s.spec.Machine.Dir):
			out = append(out, i)
		default:
			return nil, fmt.Errorf("snapshots of VMs with a writable disk of the caller's (%s) would copy the whole disk: %w; boot the VM from a disk image instead (Config.Image, --image) in isolated or shared mode", d.Path, hypervisor.ErrUnsupported)
		}
	}
	return out, nil
}

// copyDisk copies an overlay: sparse, and as a reflink (copy-on-write,
// no data copied) where the file system supports it.
func copyDisk(ctx context.Context, src, dst string) error {
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", src, dst).CombinedOutput(); err != nil {
		_ = os.Remove(dst)
		return fmt.Errorf("copy disk %s: %w: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// finishDisk makes a frozen disk independent of other snapshots, durable
// and read-only. A VM restored from a snapshot writes to an overlay whose
// backing file is that snapshot's frozen disk, so a copy of its overlay
// has the older snapshot in its chain: it is rebased onto the image (safe
// mode: the clusters the older snapshot's disk holds are copied in, only
// those), so that every snapshot depends on the image alone and can be
// deleted on its own.
func finishDisk(ctx context.Context, path, snapshotsDir string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		return fmt.Errorf("qemu-img info %s: %w%s", path, err, stderrOf(err))
	}
	var chain []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if err := json.Unmarshal(out, &chain); err != nil {
		return fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	if len(chain) > 2 && strings.HasPrefix(chain[1].Filename, snapshotsDir+string(filepath.Separator)) {
		base := chain[2]
		if out, err := exec.CommandContext(ctx, "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", base.Filename, "-F", base.Format, path).CombinedOutput(); err != nil {
			return fmt.Errorf("qemu-img rebase %s onto %s: %w: %s", path, base.Filename, err, strings.TrimSpace(string(out)))
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return os.Chmod(path, 0o400)
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// prepareDisks gives a machine started from a snapshot its disks: a fresh
// qcow2 overlay in the VM's folder on each frozen disk of the snapshot
// (the machine's drives stay as they were saved: same order, same ids).
// A restored VM that ran before (stopped, now started again) already has
// its overlay, which has moved on from the snapshot's memory: restoring
// that memory over it would corrupt the guest's file system, so the VM
// boots from its own disk instead, as a stopped VM of a disk image does.
func (s *Supervisor) prepareDisks(ctx context.Context, mc *hypervisor.MachineConfig) error {
	if mc.Incoming == "" {
		return nil
	}
	var overlays []int
	for i, d := range mc.Disks {
		if d.ReadOnly {
			continue
		}
		if _, err := os.Stat(d.Path); err == nil {
			mc.Incoming, s.spec.Restored = "", false
			mc.Cmdline = withHostname(mc.Cmdline, s.spec.Hostname)
			s.log.Debug("restored VM started again: booting from its own disk", "disk", d.Path)
			return nil
		}
		overlays = append(overlays, i)
	}
	t0 := time.Now()
	for _, i := range overlays {
		frozen := SnapshotDisk(mc.Incoming, i)
		out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", frozen, mc.Disks[i].Path).CombinedOutput()
		if err != nil {
			_ = os.Remove(mc.Disks[i].Path)
			return fmt.Errorf("create the disk overlay on snapshot disk %s: %w: %s", frozen, err, strings.TrimSpace(string(out)))
		}
	}
	if len(overlays) > 0 {
		s.log.Debug("disk overlays made on the snapshot's disks", "count", len(overlays), "took", time.Since(t0))
	}
	return nil
}

// withHostname sets smolvm.hostname= on a kernel command line.
func withHostname(cmdline, hostname string) string {
	if hostname == "" {
		return cmdline
	}
	f := strings.Fields(cmdline)
	for i := range f {
		if strings.HasPrefix(f[i], "smolvm.hostname=") {
			f[i] = "smolvm.hostname=" + hostname
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
	fi, err := os.Stat(filepath.Join(req.Dir, "memory"))
	if err != nil {
		return nil, err
	}
	return &controlpb.SnapshotResponse{MemoryBytes: fi.Size()}, nil
}
