package engine

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/rootfs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/supervisor"
	"github.com/smolvm/smolvm/internal/wire"
)

// SnapshotInfo describes a saved VM; the smolvm package's SnapshotInfo is
// its documented twin (same fields, in the same order).
type SnapshotInfo struct {
	Name                   string
	Dir                    string
	SourceVM               string
	Created                time.Time
	MemoryBytes, DiskBytes int64
	VCPUs, MemoryMiB       int
	Image                  string
	Warm                   bool
	State                  string
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
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && ProcessAlive(pid) {
		return SnapshotCreating
	}
	return SnapshotInterrupted
}

// WarmPrefix names the snapshots Setup makes for warm starts.
const WarmPrefix = "warm-"

// WarmBootArgs are added to the boot of a warm snapshot's VM.
const WarmBootArgs = "init_on_free=1"

// ErrMountsNoSnapshot says why a VM with host folders has no snapshot.
var ErrMountsNoSnapshot = fmt.Errorf("%w: a VM with host folders (mounts) cannot be snapshotted or restored from one: QEMU cannot save the state of its virtiofs devices (their daemons hold open files of the host); boot it instead", errdefs.ErrUnsupported)

// snapshotSource is a snapshot a new VM starts from.
type snapshotSource struct {
	name  string
	dir   string
	spec  supervisor.Spec
	image *resolvedImage
}

// TakeSnapshot saves VM id as name: it records the snapshot, makes its
// folder (marked as being made by this process until it is complete) and
// has take write the VM into it. A failure leaves nothing behind.
func (h *Host) TakeSnapshot(ctx context.Context, id, name string, take func(dir string, rec *store.VM) error) (*SnapshotInfo, error) {
	st := h.Store
	rec, err := st.GetVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if rec.State != store.StateRunning {
		return nil, NotRunning(rec)
	}
	dir := filepath.Join(h.Home, "snapshots", name)
	var spec supervisor.Spec
	_ = json.Unmarshal(rec.Config, &spec)
	if len(spec.Machine.Mounts) > 0 {
		return nil, ErrMountsNoSnapshot
	}
	sn := &store.Snapshot{Name: name, Dir: dir, SourceVM: id, Fingerprint: spec.ImageFingerprint}
	if err := st.CreateSnapshot(ctx, sn); err != nil {
		return nil, err
	}
	undo := func(cause error) error {
		_ = os.RemoveAll(dir)
		return errors.Join(cause, st.DeleteSnapshot(context.WithoutCancel(ctx), name))
	}
	// Until the snapshot is complete, its folder names this process: if
	// it dies meanwhile, the snapshot shows as interrupted.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, undo(fmt.Errorf("create snapshot folder: %w", err))
	}
	if err := os.WriteFile(filepath.Join(dir, snapshotMarker), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, undo(fmt.Errorf("create snapshot folder: %w", err))
	}
	if err := take(dir, rec); err != nil {
		return nil, undo(fmt.Errorf("snapshot VM %s: %w", rec.Name, err))
	}
	info := snapshotInfo(sn)
	b, _ := json.Marshal(map[string]any{"vcpus": spec.Machine.VCPUs, "memory_mib": spec.Machine.MemoryMiB, "image": rec.Image})
	sn.Info = b
	_ = writeSnapshotRow(ctx, st, sn)
	if err := os.Remove(filepath.Join(dir, snapshotMarker)); err != nil {
		return nil, undo(fmt.Errorf("snapshot VM %s: %w", rec.Name, err))
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
	in := &SnapshotInfo{Name: sn.Name, Dir: sn.Dir, SourceVM: sn.SourceVM, Created: sn.Created, Warm: strings.HasPrefix(sn.Name, WarmPrefix),
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

// Restore starts a new VM from a snapshot (see smolvm.Restore). The
// machine's shape is the snapshot's: cfg.MemoryMiB and cfg.VCPUs are
// what the caller asked for (0: nothing), and anything else is
// ErrInvalid.
func (h *Host) Restore(ctx context.Context, snapshot string, cfg VMConfig, started time.Time, attach Attach) error {
	src, err := h.loadSnapshot(ctx, &cfg, snapshot)
	if err != nil {
		return err
	}
	if mc := src.spec.Machine; cfg.MemoryMiB != 0 && cfg.MemoryMiB != mc.MemoryMiB || cfg.VCPUs != 0 && cfg.VCPUs != mc.VCPUs {
		return fmt.Errorf("%w: snapshot %q is a machine of %d MiB and %d vCPUs, and a clone has its snapshot's shape: leave MemoryMiB and VCPUs unset, or boot a VM of that shape with New", errdefs.ErrInvalid, snapshot, mc.MemoryMiB, mc.VCPUs)
	}
	return h.create(ctx, &cfg, started, src, attach)
}

func (h *Host) loadSnapshot(ctx context.Context, cfg *VMConfig, name string) (*snapshotSource, error) {
	st := h.Store
	sn, err := st.GetSnapshot(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("%w (see 'smolvm snapshot ls')", err)
	}
	switch snapshotState(sn.Dir) {
	case SnapshotCreating:
		return nil, fmt.Errorf("snapshot %q is %w: it is still being made", name, errdefs.ErrInUse)
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
		cur, err := h.resolveImage(ctx, &VMConfig{Logger: cfg.Logger})
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
func (h *Host) restoreSpec(ctx context.Context, cfg *VMConfig, src *snapshotSource, rec *store.VM, dir string) (*supervisor.Spec, error) {
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
		cid, err := h.Store.Allocate(ctx, "vsock-cid", rec.ID, 3, 1<<31)
		if err != nil {
			return nil, fmt.Errorf("allocate vsock cid: %w", err)
		}
		spec.Machine.CID = uint32(cid)
	}
	return &spec, nil
}

// Snapshots describes the snapshots of this host.
func (h *Host) Snapshots(ctx context.Context) ([]*SnapshotInfo, error) {
	sns, err := h.Store.ListSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*SnapshotInfo, 0, len(sns))
	for _, sn := range sns {
		out = append(out, snapshotInfo(sn))
	}
	return out, nil
}

// DeleteSnapshot removes a snapshot; it is refused (ErrInUse) while a VM
// has a disk backed by the snapshot's.
func (h *Host) DeleteSnapshot(ctx context.Context, name string) error {
	st := h.Store
	if _, err := Reconcile(ctx, st); err != nil {
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
			return fmt.Errorf("snapshot %q is %w by VM %s (their disks are backed by the snapshot's): delete them first (smolvm rm -f NAME)", name, errdefs.ErrInUse, strings.Join(users, ", "))
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
		if !strings.HasPrefix(f, wire.ParamHostname+"=") && f != WarmBootArgs {
			fmt.Fprint(h, f, " ")
		}
	}
	return WarmPrefix + fmt.Sprintf("%x", h.Sum(nil))[:16]
}

// findWarm returns the warm snapshot for this VM's shape, if there is one.
func (h *Host) findWarm(ctx context.Context, spec *supervisor.Spec) *store.Snapshot {
	if spec.ImageFingerprint == "" || len(spec.Machine.Disks) > 0 {
		return nil
	}
	sn, err := h.Store.GetSnapshot(ctx, warmKey(spec))
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
func (h *Host) warnStaleWarm(ctx context.Context, spec *supervisor.Spec, log *slog.Logger) {
	if spec.ImageFingerprint == "" || len(spec.Machine.Disks) > 0 {
		return // never restored from a warm snapshot
	}
	sns, _ := h.Store.ListSnapshots(ctx)
	for _, sn := range sns {
		if !strings.HasPrefix(sn.Name, WarmPrefix) {
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

// WarmName is the warm snapshot that VM id, just made by New for the
// warm snapshot (see smolvm's ensureWarm), is to be saved as; "" when the
// VM was restored from a current one, which is then the only warm
// snapshot kept. A warm snapshot of that name that did not restore is
// removed.
func (h *Host) WarmName(ctx context.Context, id string) (string, error) {
	st := h.Store
	rec, err := st.GetVM(ctx, id)
	if err != nil {
		return "", err
	}
	if rec.Snapshot != "" {
		// Restored: this shape's warm snapshot is current and works.
		h.DropOtherWarm(ctx, rec.Snapshot)
		return "", nil
	}
	var spec supervisor.Spec
	if err := json.Unmarshal(rec.Config, &spec); err != nil {
		return "", err
	}
	name := warmKey(&spec)
	if sn, err := st.GetSnapshot(ctx, name); err == nil {
		// There, but New booted instead: it did not restore. Remake it.
		if err := st.DeleteSnapshot(ctx, name); err != nil {
			return "", fmt.Errorf("warm snapshot %s does not restore and cannot be replaced: %w", name, err)
		}
		_ = os.RemoveAll(sn.Dir)
	}
	return name, nil
}

// DropOtherWarm deletes the warm snapshots other than keep: those of older
// images or shapes are dead weight. One a VM still uses stays (and goes on
// a later setup).
func (h *Host) DropOtherWarm(ctx context.Context, keep string) {
	st := h.Store
	sns, _ := st.ListSnapshots(ctx)
	for _, sn := range sns {
		if strings.HasPrefix(sn.Name, WarmPrefix) && sn.Name != keep {
			if st.DeleteSnapshot(ctx, sn.Name) == nil {
				_ = os.RemoveAll(sn.Dir)
			}
		}
	}
}

// Quiet is log without the records below level: the warm snapshot's VM
// logs only errors, since New's warnings about a stale or broken warm
// snapshot tell the user to run setup, which is what makes it.
func Quiet(log *slog.Logger, level slog.Level) *slog.Logger {
	return slog.New(minLevel{log.Handler(), level})
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
