package smolvm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/store"
)

// Host is one state folder: its VMs, snapshots and images, and the one
// store (a SQLite database) every handle opened through it shares. A
// program that makes VM after VM, or serves many, opens one Host and
// creates and opens its VMs through it; Host's methods are safe for
// concurrent use.
//
// The package-level New, Restore, Open, List, Cleanup, Setup, BuildImage
// and ImportImage are conveniences that open a Host of their own for the
// call (a VM they return closes it with itself).
type Host struct {
	home string
	eng  *engine.Host // the engine of the state folder
	st   *store.Store // eng.Store

	mu     sync.Mutex
	closed bool
}

// OpenHost opens the state folder home, creating it when missing; ""
// is Home() ($SMOLVM_HOME, else $XDG_STATE_HOME/smolvm, else
// ~/.local/state/smolvm). Close it when done: the VMs it opened must not
// be used after that.
func OpenHost(home string) (*Host, error) {
	eng, err := engine.OpenHost(context.Background(), home, Version)
	if err != nil {
		return nil, err
	}
	return &Host{home: eng.Home, eng: eng, st: eng.Store}, nil
}

// Home is the state folder of this host.
func (h *Host) Home() string { return h.home }

// Close releases the store. VMs that live in this process (New without
// Persistent) are not stopped: close them first.
func (h *Host) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	return h.eng.Close()
}

// checkHome accepts an options' state folder that is empty or this host's
// and returns this host's: a Host's calls work in its own folder.
func (h *Host) checkHome(home string) (string, error) {
	if home != "" && filepath.Clean(home) != h.home {
		return "", fmt.Errorf("%w: state folder %s given to the host of %s: open a Host for it (OpenHost) or leave it empty", ErrInvalid, home, h.home)
	}
	return h.home, nil
}

// handOver gives a VM opened through a host of its own its host: closing
// the VM closes it (the package-level conveniences).
func (h *Host) handOver(vm *VM, err error) (*VM, error) {
	if err != nil {
		return nil, errors.Join(err, h.Close())
	}
	vm.ownHost = true
	return vm, nil
}

// New is New in this host's state folder: cfg.Home is empty or its own.
func (h *Host) New(ctx context.Context, cfg Config) (*VM, error) {
	if _, err := h.checkHome(cfg.Home); err != nil {
		return nil, err
	}
	return newVM(ctx, h, cfg)
}

// Restore is Restore in this host's state folder: cfg.Home is empty or
// its own.
func (h *Host) Restore(ctx context.Context, snapshot string, cfg Config) (*VM, error) {
	if _, err := h.checkHome(cfg.Home); err != nil {
		return nil, err
	}
	return restore(ctx, h, snapshot, cfg)
}

// Open returns a handle on an existing VM by id, unique id prefix or name.
func (h *Host) Open(ctx context.Context, ref string) (*VM, error) {
	return open(ctx, h, ref, nil)
}

// List describes every VM of this host. A VM whose supervisor died is
// reported (and recorded) as failed with the reason; one whose supervisor
// lives but does not answer within a couple of seconds is reported as
// StateUnresponsive (not recorded).
func (h *Host) List(ctx context.Context) ([]*Info, error) { return list(ctx, h.st) }

// Cleanup is Cleanup in this host's state folder: opts.Home is empty or
// its own.
func (h *Host) Cleanup(ctx context.Context, opts CleanupOptions) ([]string, error) {
	if _, err := h.checkHome(opts.Home); err != nil {
		return nil, err
	}
	return cleanup(ctx, h, opts)
}

// Snapshots describes the snapshots of this host.
func (h *Host) Snapshots(ctx context.Context) ([]*SnapshotInfo, error) {
	sns, err := h.eng.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*SnapshotInfo, 0, len(sns))
	for _, sn := range sns {
		out = append(out, (*SnapshotInfo)(sn))
	}
	return out, nil
}

// DeleteSnapshot removes a snapshot; it is refused (ErrInUse) while a
// running VM was restored from it, and while any VM (even stopped) has a
// disk backed by the snapshot's.
func (h *Host) DeleteSnapshot(ctx context.Context, name string) error {
	return h.eng.DeleteSnapshot(ctx, name)
}

// Images returns the default image (when set up) and every named image.
func (h *Host) Images(ctx context.Context) ([]*ImageInfo, error) {
	ims, err := h.eng.Images(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*ImageInfo, 0, len(ims))
	for _, im := range ims {
		in, _ := imageInfoOf(im, nil)
		out = append(out, in)
	}
	return out, nil
}

// InspectImage describes one image; an unknown name wraps ErrNotFound.
func (h *Host) InspectImage(ctx context.Context, name string) (*ImageInfo, error) {
	return imageInfoOf(h.eng.InspectImage(ctx, name))
}

// RemoveImage deletes a named image. It is refused (ErrInUse) while a VM,
// running or stopped, uses it.
func (h *Host) RemoveImage(ctx context.Context, name string) error {
	if name == DefaultImage {
		return fmt.Errorf("%w: the default image cannot be removed (its files are in the cache)", ErrInvalid)
	}
	return h.eng.RemoveImage(ctx, name)
}

// PruneImages removes the named images no VM uses, then the cached disks
// and Debian trees no remaining image was built from, and leftovers of
// interrupted builds.
func (h *Host) PruneImages(ctx context.Context) (*PruneReport, error) {
	rep, err := h.eng.PruneImages(ctx)
	if rep == nil {
		return nil, err
	}
	return &PruneReport{Images: rep.Images, Cache: rep.Cache, Freed: rep.Freed}, err
}

// BuildImage is BuildImage in this host's state folder: opts.Home is
// empty or its own.
func (h *Host) BuildImage(ctx context.Context, opts BuildOptions) (*ImageInfo, error) {
	if _, err := h.checkHome(opts.Home); err != nil {
		return nil, err
	}
	eo, err := buildOptions(opts)
	if err != nil {
		return nil, err
	}
	return imageInfoOf(h.eng.BuildImage(ctx, opts.Name, eo))
}

// ImportImage is ImportImage in this host's state folder: opts.Home is
// empty or its own.
func (h *Host) ImportImage(ctx context.Context, opts ImportOptions) (*ImageInfo, error) {
	if _, err := h.checkHome(opts.Home); err != nil {
		return nil, err
	}
	eo, err := importOptions(opts)
	if err != nil {
		return nil, err
	}
	return imageInfoOf(h.eng.ImportImage(ctx, eo))
}

// Setup is Setup for this host's state folder: opts.Home is empty or its
// own.
func (h *Host) Setup(ctx context.Context, opts SetupOptions) (*SetupResult, error) {
	if _, err := h.checkHome(opts.Home); err != nil {
		return nil, err
	}
	return setup(ctx, h, h.home, opts)
}

// Capacity returns the limits a new VM of this host is checked against
// when its Config sets none (see the package-level Capacity).
func (h *Host) Capacity() (maxVMs, maxMemoryMiB int, err error) { return Capacity() }

// RetainedDisk is where the overlay of a VM created with RetainDisk is
// kept after the VM is deleted.
func (h *Host) RetainedDisk(vmName, vmID string) string { return h.eng.RetainedDisk(vmName, vmID) }

// AccelReport says which accelerator VMs use on this host, and why.
type AccelReport struct {
	// Accel is "kvm" or "tcg".
	Accel  string `json:"accel"`
	Reason string `json:"reason"`
	// Cached: the answer of an earlier probe of the same kernel, initrd
	// and QEMU.
	Cached bool `json:"cached"`
}

// ProbeAccel decides between KVM and TCG for this kernel: KVM only when
// /dev/kvm opens and a real boot with it reaches the guest agent. The
// result is cached in the host's state folder per kernel, initrd and QEMU
// binary.
func (h *Host) ProbeAccel(ctx context.Context, kernel, initrd string) AccelReport {
	return AccelReport(engine.ProbeAccel(ctx, h.home, kernel, initrd))
}
