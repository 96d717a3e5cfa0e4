package smolvm

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/proto/controlpb"
	"github.com/smolvm/smolvm/internal/rootfs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
	"github.com/smolvm/smolvm/internal/wire"
)

// SnapshotInfo describes a saved VM.
type SnapshotInfo struct {
	Name     string    `json:"name"`
	Dir      string    `json:"dir"`
	SourceVM string    `json:"source_vm"`
	Created  time.Time `json:"created"`
	// MemoryBytes is what the saved memory and device state take on the
	// host: the migration stream, and the memory file if the snapshot has
	// one (its allocated blocks: free guest memory is a hole).
	MemoryBytes int64 `json:"memory_bytes"`
	// DiskBytes is what the snapshot's frozen disks take on the host: the
	// VM's changes to its image, not the image.
	DiskBytes int64  `json:"disk_bytes,omitempty"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	Image     string `json:"image"`
	Warm      bool   `json:"warm,omitempty"`
	// State is "" for a snapshot that is complete, SnapshotCreating while
	// it is being made and SnapshotInterrupted when the process making it
	// died first (it does not restore; cleanup removes it).
	State string `json:"state,omitempty"`
}

// States of a snapshot that is not complete (SnapshotInfo.State).
const (
	SnapshotCreating    = "creating"
	SnapshotInterrupted = "interrupted"
)

// snapshotMarker is a file in a snapshot folder while the snapshot is
// being made: the pid of the process making it. It goes when the snapshot
// is complete, so a snapshot whose maker was killed keeps it.
const snapshotMarker = "creating.pid"

// snapshotState tells a complete snapshot ("") from one being made and
// one whose making was interrupted.
func snapshotState(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, snapshotMarker))
	if err != nil {
		return ""
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && engine.ProcessAlive(pid) {
		return SnapshotCreating
	}
	return SnapshotInterrupted
}

// warmPrefix names the snapshots Setup makes for warm starts.
const warmPrefix = "warm-"

// warmBootArgs are added to the boot of a warm snapshot's VM.
const warmBootArgs = "init_on_free=1"

var snapNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

// snapshotSource is a snapshot a new VM starts from.
type snapshotSource struct {
	name  string
	dir   string
	spec  supervisor.Spec
	image *resolvedImage
}

// Snapshot saves the VM's memory, device state and settings under name,
// and its disk when it was booted from a disk image: in isolated mode a
// copy of its overlay (only what the VM changed on top of the image), in
// shared mode the read-only image by reference. The VM pauses while it is
// written and then goes on; commands running across a snapshot lose their
// connection. Any number of VMs can be restored from one snapshot at once,
// each on a disk overlay of its own.
func (vm *VM) Snapshot(ctx context.Context, name string) (*SnapshotInfo, error) {
	if !snapNameRE.MatchString(name) || strings.HasPrefix(name, warmPrefix) {
		return nil, fmt.Errorf("%w: snapshot name %q: use 1-63 letters, digits, '_', '.', '-' (not starting with %q)", ErrInvalid, name, warmPrefix)
	}
	return vm.snapshot(ctx, name, false)
}

// snapshot saves the VM as name; warm is for the warm snapshot, whose VM
// nothing else calls meanwhile (see supervisor.SnapshotOptions.KeepLane).
func (vm *VM) snapshot(ctx context.Context, name string, warm bool) (*SnapshotInfo, error) {
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	if rec.State != store.StateRunning {
		return nil, notRunning(rec)
	}
	dir := filepath.Join(homeOf(vm.st), "snapshots", name)
	var spec supervisor.Spec
	_ = json.Unmarshal(rec.Config, &spec)
	if len(spec.Machine.Mounts) > 0 {
		return nil, errMountsNoSnapshot
	}
	sn := &store.Snapshot{Name: name, Dir: dir, SourceVM: vm.id, Fingerprint: spec.ImageFingerprint}
	if err := vm.st.CreateSnapshot(ctx, sn); err != nil {
		return nil, err
	}
	undo := func(cause error) error {
		_ = os.RemoveAll(dir)
		return errors.Join(cause, vm.st.DeleteSnapshot(context.WithoutCancel(ctx), name))
	}
	// Until the snapshot is complete, its folder names this process: if
	// it dies meanwhile, the snapshot shows as interrupted.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, undo(fmt.Errorf("create snapshot folder: %w", err))
	}
	if err := os.WriteFile(filepath.Join(dir, snapshotMarker), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, undo(fmt.Errorf("create snapshot folder: %w", err))
	}
	vm.mu.Lock()
	sup, control := vm.sup, vm.control
	vm.mu.Unlock()
	switch {
	case sup != nil:
		err = sup.Snapshot(ctx, dir, supervisor.SnapshotOptions{Resume: true, KeepLane: warm})
	case control != nil:
		if _, err = control.Snapshot(ctx, &controlpb.SnapshotRequest{Dir: dir, Resume: true}); err != nil {
			err = vm.apiErr(ctx, "", err)
		}
	default:
		err = notRunning(rec)
	}
	if err != nil {
		return nil, undo(fmt.Errorf("snapshot VM %s: %w", vm.name, err))
	}
	info := snapshotInfo(sn)
	b, _ := json.Marshal(map[string]any{"vcpus": spec.Machine.VCPUs, "memory_mib": spec.Machine.MemoryMiB, "image": rec.Image})
	sn.Info = b
	_ = writeSnapshotRow(ctx, vm.st, sn)
	if err := os.Remove(filepath.Join(dir, snapshotMarker)); err != nil {
		return nil, undo(fmt.Errorf("snapshot VM %s: %w", vm.name, err))
	}
	return info, nil
}

func writeSnapshotRow(ctx context.Context, st *store.Store, sn *store.Snapshot) error {
	if err := st.DeleteSnapshot(ctx, sn.Name); err != nil {
		return err
	}
	return st.CreateSnapshot(ctx, sn)
}

func snapshotInfo(sn *store.Snapshot) *SnapshotInfo {
	in := &SnapshotInfo{Name: sn.Name, Dir: sn.Dir, SourceVM: sn.SourceVM, Created: sn.Created, Warm: strings.HasPrefix(sn.Name, warmPrefix),
		State: snapshotState(sn.Dir)}
	if spec, err := readSnapshotSpec(sn.Dir); err == nil {
		in.VCPUs, in.MemoryMiB = spec.Machine.VCPUs, spec.Machine.MemoryMiB
		if l, err := spec.SnapshotLayout(); err == nil {
			if fi, err := os.Stat(l.StatePath(sn.Dir)); err == nil {
				in.MemoryBytes = fi.Size() + rootfs.DiskUsage(l.MemoryPath(sn.Dir))
			}
		}
	}
	for _, d := range frozenDisks(sn.Dir) {
		in.DiskBytes += rootfs.DiskUsage(d)
	}
	var extra struct {
		Image string `json:"image"`
	}
	_ = json.Unmarshal(sn.Info, &extra)
	in.Image = extra.Image
	return in
}

// Restore starts a new VM from a snapshot. Only the name, persistence,
// state folder, logger and timeouts of cfg apply: the machine's shape is
// the snapshot's (a MemoryMiB or VCPUs set to something else is
// ErrInvalid). The clone is a distinct machine: fresh entropy, the
// host's wall clock, its own hostname and machine id. A clone of a VM
// booted from a disk image writes to an overlay of its own on the
// snapshot's disk; started again after a stop, it boots from that disk.
//
// Restore opens a Host of cfg.Home for the VM (closed with it).
func Restore(ctx context.Context, snapshot string, cfg Config) (*VM, error) {
	valid := cfg // a config that is refused makes no state folder
	if err := valid.setDefaults(); err != nil {
		return nil, err
	}
	h, err := OpenHost(cfg.Home)
	if err != nil {
		return nil, err
	}
	return h.handOver(restore(ctx, h, snapshot, cfg))
}

func restore(ctx context.Context, h *Host, snapshot string, cfg Config) (*VM, error) {
	started := time.Now()
	mem, cpus := cfg.MemoryMiB, cfg.VCPUs // the shape asked for, before defaults
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if len(cfg.Mounts) > 0 {
		return nil, errMountsNoSnapshot
	}
	st := h.st
	src, err := loadSnapshot(ctx, st, &cfg, snapshot)
	if err == nil {
		if mc := src.spec.Machine; mem != 0 && mem != mc.MemoryMiB || cpus != 0 && cpus != mc.VCPUs {
			err = fmt.Errorf("%w: snapshot %q is a machine of %d MiB and %d vCPUs, and a clone has its snapshot's shape: leave MemoryMiB and VCPUs unset, or boot a VM of that shape with New", ErrInvalid, snapshot, mc.MemoryMiB, mc.VCPUs)
		}
	}
	if err == nil {
		var vm *VM
		if vm, err = create(ctx, h, &cfg, started, src); err == nil {
			return vm, nil
		}
	}
	return nil, err
}

func loadSnapshot(ctx context.Context, st *store.Store, cfg *Config, name string) (*snapshotSource, error) {
	sn, err := st.GetSnapshot(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("%w (see 'smolvm snapshot ls')", err)
	}
	switch snapshotState(sn.Dir) {
	case SnapshotCreating:
		return nil, fmt.Errorf("snapshot %q is %w: it is still being made", name, ErrInUse)
	case SnapshotInterrupted:
		return nil, fmt.Errorf("snapshot %q is incomplete: the process making it died first: delete it with 'smolvm snapshot rm %s' or 'smolvm cleanup'", name, name)
	}
	src := &snapshotSource{name: sn.Name, dir: sn.Dir}
	src.spec, err = readSnapshotSpec(sn.Dir)
	var layout hypervisor.SnapshotLayout
	if err == nil {
		layout, err = src.spec.SnapshotLayout()
	}
	if err == nil {
		_, err = os.Stat(layout.StatePath(sn.Dir))
	}
	if err == nil && src.spec.Machine.MemoryFile != "" {
		// The source's memory was a file: the snapshot holds it.
		_, err = os.Stat(layout.MemoryPath(sn.Dir))
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %q is damaged (%w): delete it with 'smolvm snapshot rm %s'", name, err, name)
	}
	if src.spec.MachineLayout != hypervisor.MachineLayout {
		return nil, fmt.Errorf("snapshot %q is stale: it was taken by a smolvm whose virtual machine differs from this one's (layout %d, now %d): delete it with 'smolvm snapshot rm %s' and take a new one", name, src.spec.MachineLayout, hypervisor.MachineLayout, name)
	}
	mc := src.spec.Machine
	for _, f := range []string{mc.Kernel, mc.Initrd} {
		if _, err := os.Stat(f); f != "" && err != nil {
			return nil, fmt.Errorf("snapshot %q is stale: its kernel or initramfs %s is gone: delete it with 'smolvm snapshot rm %s' and take a new one", name, f, name)
		}
	}
	// The disks: the frozen copy of each overlay, and the read-only image
	// of a shared disk.
	for i, d := range mc.Disks {
		if d.ReadOnly {
			if _, err := os.Stat(d.Path); err != nil {
				return nil, fmt.Errorf("snapshot %q is stale: its disk image %s is gone: delete it with 'smolvm snapshot rm %s'", name, d.Path, name)
			}
		} else if _, err := os.Stat(layout.Disk(sn.Dir, i)); err != nil {
			return nil, fmt.Errorf("snapshot %q is damaged (%w): delete it with 'smolvm snapshot rm %s'", name, err, name)
		}
	}
	imageName := DefaultImage
	var extra struct {
		Image string `json:"image"`
	}
	_ = json.Unmarshal(sn.Info, &extra)
	if len(mc.Disks) > 0 && extra.Image != "" {
		// The clone uses the image too (its disk is backed by it): image
		// rm is refused while it exists.
		imageName = extra.Image
	}
	src.image = &resolvedImage{name: imageName, kernel: mc.Kernel, initrd: mc.Initrd, fingerprint: src.spec.ImageFingerprint}
	if src.spec.ImageFingerprint != "" {
		// A VM of a named image has "<default image>+<image digest>".
		boot, digest, named := strings.Cut(src.spec.ImageFingerprint, "+")
		cur, err := resolveImage(ctx, homeOf(st), &Config{Logger: cfg.Logger})
		if err == nil && cur.fingerprint != boot {
			return nil, fmt.Errorf("snapshot %q is stale: the kernel, initramfs or agent changed since it was taken: delete it with 'smolvm snapshot rm %s' and take a new one", name, name)
		}
		if named && imageName != DefaultImage {
			if im, err := st.GetImage(ctx, imageName); err != nil || im.Digest != digest {
				return nil, fmt.Errorf("snapshot %q is stale: its disk image %q was removed or rebuilt since it was taken: delete it with 'smolvm snapshot rm %s' and take a new one", name, imageName, name)
			}
		}
	}
	return src, nil
}

// readSnapshotSpec reads the machine a snapshot folder was saved from.
func readSnapshotSpec(dir string) (supervisor.Spec, error) {
	var spec supervisor.Spec
	b, err := os.ReadFile(filepath.Join(dir, supervisor.SnapshotSpec))
	if err == nil {
		err = json.Unmarshal(b, &spec)
	}
	return spec, err
}

// restoreFrom points a machine at the snapshot folder it starts from; the
// driver finds its state there, and its memory file when it holds one.
func restoreFrom(mc *hypervisor.MachineConfig, dir string) {
	mc.Restore, mc.MemoryFile = &hypervisor.Restore{Dir: dir}, ""
}

// restoreSpec is the snapshot's machine, moved into the new VM's folder.
func restoreSpec(ctx context.Context, st *store.Store, cfg *Config, src *snapshotSource, rec *store.VM, dir string) (*supervisor.Spec, error) {
	spec := src.spec
	spec.Machine.ID, spec.Machine.Dir = rec.ID, dir
	spec.Machine.ConsoleLog = filepath.Join(dir, supervisor.ConsoleLog)
	spec.Machine.ConsoleLogMaxBytes = cfg.ConsoleLogMaxBytes
	restoreFrom(&spec.Machine, src.dir)
	// Same drives in the same order as the saved machine (its device
	// state refers to them); each writable one is a new overlay in this
	// VM's folder, made on the snapshot's frozen disk when the supervisor
	// starts the machine (supervisor.prepareDisks).
	spec.Machine.Disks = append([]hypervisor.Disk(nil), spec.Machine.Disks...)
	for i := range spec.Machine.Disks {
		if d := &spec.Machine.Disks[i]; !d.ReadOnly {
			d.Path = filepath.Join(dir, filepath.Base(d.Path))
		}
	}
	spec.Restored, spec.Hostname, spec.Persistent = true, rec.Name, cfg.Persistent
	spec.SupervisorBinary = cfg.SupervisorBinary
	spec.BootTimeout = cfg.BootTimeout
	if spec.Machine.Channel == hypervisor.ChannelVsock {
		cid, err := st.Allocate(ctx, "vsock-cid", rec.ID, 3, 1<<31)
		if err != nil {
			return nil, fmt.Errorf("allocate vsock cid: %w", err)
		}
		spec.Machine.CID = uint32(cid)
	}
	return &spec, nil
}

func listSnapshots(ctx context.Context, st *store.Store) ([]*SnapshotInfo, error) {
	sns, err := st.ListSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*SnapshotInfo, 0, len(sns))
	for _, sn := range sns {
		out = append(out, snapshotInfo(sn))
	}
	return out, nil
}

func deleteSnapshot(ctx context.Context, st *store.Store, name string) error {
	if _, err := engine.Reconcile(ctx, st); err != nil {
		return err
	}
	sn, err := st.GetSnapshot(ctx, name)
	if err != nil {
		return fmt.Errorf("%w (see 'smolvm snapshot ls')", err)
	}
	if len(frozenDisks(sn.Dir)) > 0 {
		vms, err := st.ListVMs(ctx)
		if err != nil {
			return err
		}
		var users []string
		for _, v := range vms {
			if v.Snapshot == name {
				users = append(users, v.Name+" ("+v.ID+", "+v.State+")")
			}
		}
		if len(users) > 0 {
			return fmt.Errorf("snapshot %q is %w by VM %s (their disks are backed by the snapshot's): delete them first (smolvm rm -f NAME)", name, ErrInUse, strings.Join(users, ", "))
		}
	}
	if err := st.DeleteSnapshot(ctx, name); err != nil {
		return err
	}
	if err := os.RemoveAll(sn.Dir); err != nil {
		return fmt.Errorf("remove snapshot folder: %w", err)
	}
	return nil
}

// frozenDisks lists the frozen disks in a snapshot folder.
func frozenDisks(dir string) []string {
	spec, err := readSnapshotSpec(dir)
	if err != nil {
		return nil
	}
	l, err := spec.SnapshotLayout()
	if err != nil {
		return nil
	}
	return l.Disks(dir)
}

// warmKey names the warm snapshot of a machine shape: everything that must
// match for a restore, nothing that differs per VM.
func warmKey(spec *supervisor.Spec) string {
	mc := spec.Machine
	h := sha256.New()
	if spec.Driver != hypervisor.Default { // the default's keys are as they were before drivers had names here
		fmt.Fprintf(h, "driver=%s|", spec.Driver)
	}
	fmt.Fprintf(h, "%s|%d|%d|%d|%s|%s|%d|%d|", spec.ImageFingerprint, spec.MachineLayout, mc.VCPUs, mc.MemoryMiB, mc.Accel, mc.Channel, len(mc.Disks), len(mc.Net))
	for _, f := range strings.Fields(mc.Cmdline) {
		if !strings.HasPrefix(f, wire.ParamHostname+"=") && f != warmBootArgs {
			fmt.Fprint(h, f, " ")
		}
	}
	return warmPrefix + fmt.Sprintf("%x", h.Sum(nil))[:16]
}

// findWarm returns the warm snapshot for this VM's shape, if there is one.
func findWarm(ctx context.Context, st *store.Store, spec *supervisor.Spec) *store.Snapshot {
	if spec.ImageFingerprint == "" || len(spec.Machine.Disks) > 0 {
		return nil
	}
	sn, err := st.GetSnapshot(ctx, warmKey(spec))
	if err != nil || snapshotState(sn.Dir) != "" {
		return nil
	}
	// Warm snapshots hold their VM's memory file (see ensureWarm).
	l, err := spec.SnapshotLayout()
	if err != nil {
		return nil
	}
	for _, f := range []string{l.StatePath(sn.Dir), l.MemoryPath(sn.Dir)} {
		if _, err := os.Stat(f); err != nil {
			return nil
		}
	}
	return sn
}

// warnStaleWarm says why a VM that a warm snapshot of its shape would have
// restored boots instead: its snapshot was made for another kernel,
// initramfs or agent, or by a smolvm with another machine layout (an
// upgrade, a rebuilt image), and setup remakes it. A VM of another shape
// (memory, CPUs, boot arguments) has no warm snapshot to miss.
func warnStaleWarm(ctx context.Context, st *store.Store, spec *supervisor.Spec, log *slog.Logger) {
	if spec.ImageFingerprint == "" || len(spec.Machine.Disks) > 0 {
		return // never restored from a warm snapshot
	}
	sns, _ := st.ListSnapshots(ctx)
	for _, sn := range sns {
		if !strings.HasPrefix(sn.Name, warmPrefix) {
			continue
		}
		old, err := readSnapshotSpec(sn.Dir)
		if err != nil {
			continue
		}
		// Same shape but for what an upgrade or a rebuild changes?
		s := *spec
		s.ImageFingerprint, s.MachineLayout = old.ImageFingerprint, old.MachineLayout
		if warmKey(&s) == sn.Name {
			log.Warn(fmt.Sprintf("the warm snapshot %s is stale (the kernel, initramfs, agent or smolvm changed since it was made): booting cold (0.5–2 s instead of 0.1–0.2 s); run 'smolvm setup' to remake it", sn.Name))
			return
		}
	}
}

// ensureWarm makes the warm snapshot of the default VM shape, unless it is
// there and restores. It starts a VM of that shape as New would: a restore
// of the warm snapshot when there is a current one (a fraction of a second:
// setup run again stays quick), else a cold boot, which it primes, saves and
// deletes. Warm snapshots of other images or shapes are removed.
func ensureWarm(ctx context.Context, h *Host, cfg Config) error {
	cfg.Cold, cfg.Persistent, cfg.Name = false, false, ""
	// Zeroing freed pages makes most of guest memory zero pages, which
	// the snapshot skips (110 → 71 MB). Only the warm boot pays for it:
	// it touches all guest memory, which VMs that boot cold should not.
	cfg.BootArgs = strings.TrimSpace(cfg.BootArgs + " " + warmBootArgs)
	// Its memory is a file, which becomes the snapshot's memory as it is:
	// clones map it copy-on-write instead of loading a migration stream
	// of all of it (see hypervisor.MachineConfig.MemoryFile).
	cfg.fileMemory = true
	// New's warnings about a stale or broken warm snapshot tell the user to
	// run setup, which is what this is.
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.Logger = slog.New(minLevel{cfg.Logger.Handler(), slog.LevelError})
	vm, err := h.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("warm snapshot: boot: %w", err)
	}
	defer vm.Close()
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return err
	}
	if rec.Snapshot != "" {
		// Restored: this shape's warm snapshot is current and works.
		dropOtherWarm(ctx, vm.st, rec.Snapshot)
		return nil
	}
	var spec supervisor.Spec
	if err := json.Unmarshal(rec.Config, &spec); err != nil {
		return err
	}
	name := warmKey(&spec)
	if sn, err := vm.st.GetSnapshot(ctx, name); err == nil {
		// There, but New booted instead: it did not restore. Remake it.
		if err := vm.st.DeleteSnapshot(ctx, name); err != nil {
			return fmt.Errorf("warm snapshot %s does not restore and cannot be replaced: %w", name, err)
		}
		_ = os.RemoveAll(sn.Dir)
	}
	// A clone's first calls are a refresh and, mostly, a command: make
	// both once so that what the guest builds for them on first use is in
	// the snapshot.
	if err := vm.sup.Prime(ctx); err != nil {
		return fmt.Errorf("warm snapshot: prime: %w", err)
	}
	if _, err := vm.Run(ctx, "true"); err != nil {
		return fmt.Errorf("warm snapshot: prime: %w", err)
	}
	if _, err := vm.snapshot(ctx, name, true); err != nil {
		return fmt.Errorf("warm snapshot: %w", err)
	}
	dropOtherWarm(ctx, vm.st, name)
	return nil
}

// dropOtherWarm deletes the warm snapshots other than keep: those of older
// images or shapes are dead weight. One a VM still uses stays (and goes on
// a later setup).
func dropOtherWarm(ctx context.Context, st *store.Store, keep string) {
	sns, _ := st.ListSnapshots(ctx)
	for _, sn := range sns {
		if strings.HasPrefix(sn.Name, warmPrefix) && sn.Name != keep {
			if st.DeleteSnapshot(ctx, sn.Name) == nil {
				_ = os.RemoveAll(sn.Dir)
			}
		}
	}
}

// minLevel is a slog handler that drops records below min.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (h minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h minLevel) WithAttrs(as []slog.Attr) slog.Handler {
	return minLevel{h.Handler.WithAttrs(as), h.min}
}

func (h minLevel) WithGroup(name string) slog.Handler {
	return minLevel{h.Handler.WithGroup(name), h.min}
}

// Pause freezes the VM's vCPUs; its memory stays. Commands in it stall
// until Resume.
func (vm *VM) Pause(ctx context.Context) error { return vm.setPaused(ctx, true) }

// Resume lets a paused VM run again.
func (vm *VM) Resume(ctx context.Context) error { return vm.setPaused(ctx, false) }

func (vm *VM) setPaused(ctx context.Context, pause bool) error {
	vm.mu.Lock()
	control := vm.control
	vm.mu.Unlock()
	rec, err := vm.st.GetVM(ctx, vm.id)
	if err != nil {
		return err
	}
	if control == nil || !rec.Live() {
		return notRunning(rec)
	}
	// The supervisor records the state.
	if pause {
		_, err = control.Pause(ctx, &controlpb.PauseRequest{})
	} else {
		_, err = control.Resume(ctx, &controlpb.ResumeRequest{})
	}
	if err != nil {
		return vm.apiErr(ctx, "VM "+vm.name, err)
	}
	return nil
}
