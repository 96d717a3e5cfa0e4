package engine

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
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/rootfs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/wire"
)

// KernelEnv selects the default kernel (smolvm.KernelEnv documents it).
const KernelEnv = "SMOLVM_KERNEL"

// UseTunedKernel reports whether New boots the tuned kernel cached under
// cacheDir: it boots about twice as fast as the stock kernel, so a host that
// built it ('smolvm kernel build' or 'smolvm setup --tuned-kernel') uses it.
func UseTunedKernel(cacheDir string) bool {
	if os.Getenv(KernelEnv) == "stock" {
		return false
	}
	_, ok := image.TunedKernel(cacheDir)
	return ok
}

// resolvedImage is the kernel and initrd a VM boots.
type resolvedImage struct {
	name        string
	kernel      string
	initrd      string
	fingerprint string
	tuned       bool // the tuned kernel: everything built in, booted through PVH
}

// resolveImage finds the kernel and initramfs cfg boots (making the
// default image when it is not cached).
func (h *Host) resolveImage(ctx context.Context, cfg *VMConfig) (*resolvedImage, error) {
	if cfg.KernelPath != "" && cfg.InitrdPath != "" {
		return &resolvedImage{name: "custom", kernel: cfg.KernelPath, initrd: cfg.InitrdPath}, nil
	}
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	cache := h.cacheDir()
	tuned := cfg.KernelPath == "" && UseTunedKernel(cache)
	if cfg.KernelPath == "" && !tuned && os.Getenv(KernelEnv) == "tuned" {
		return nil, fmt.Errorf("%s=tuned but no tuned kernel is cached in %s: run 'smolvm kernel build'", KernelEnv, image.TunedKernelDir(cache))
	}
	d, err := image.EnsureDefault(ctx, image.Options{
		CacheDir: cache, AgentPath: agent, KernelPath: cfg.KernelPath, Logger: cfg.Logger, Tuned: tuned,
	})
	if err != nil {
		return nil, fmt.Errorf("default image: %w", err)
	}
	r := &resolvedImage{name: "default", kernel: d.Kernel, initrd: d.Initrd, fingerprint: d.Fingerprint, tuned: tuned}
	if cfg.InitrdPath != "" {
		r.initrd, r.name = cfg.InitrdPath, "custom"
	}
	return r, nil
}

// named reports whether cfg boots a named disk image.
func (cfg *VMConfig) named() bool { return cfg.Image != "" && cfg.Image != DefaultImage }

// useNamedImage checks the image cfg.Image names before a VM of it is
// created and records its name on the VM.
func (h *Host) useNamedImage(ctx context.Context, cfg *VMConfig, img *resolvedImage) error {
	if !cfg.named() {
		return nil
	}
	im, err := h.Store.GetImage(ctx, cfg.Image)
	if err != nil {
		return fmt.Errorf("%w: see 'smolvm image ls'", err)
	}
	var meta imageMeta
	_ = json.Unmarshal(im.Info, &meta)
	if meta.Rootfs == "" {
		return fmt.Errorf("image %q has no root disk: rebuild it", cfg.Image)
	}
	if err := rootfs.Validate(ctx, meta.Rootfs); err != nil {
		return fmt.Errorf("image %q: %w: rebuild or re-import it", cfg.Image, err)
	}
	img.name = cfg.Image
	img.fingerprint += "+" + im.Digest
	return nil
}

// retainMarker in a VM folder names where its overlay goes on delete.
const retainMarker = "retain-disk"

// RetainedDisk is where the overlay of a VM created with RetainDisk is
// kept after the VM is deleted.
func (h *Host) RetainedDisk(vmName, vmID string) string {
	return filepath.Join(h.Home, "disks", vmName+"-"+vmID+".qcow2")
}

// attachDisks adds the VM's disks to mc: cfg.RootfsPath as given, or
// the named image's disk in the VM's disk mode, with the kernel command
// line that makes the guest switch its root to it.
func (h *Host) attachDisks(ctx context.Context, cfg *VMConfig, rec *store.VM, mc *hypervisor.MachineConfig) error {
	if cfg.RootfsPath != "" {
		mc.Disks = append(mc.Disks, hypervisor.Disk{Path: cfg.RootfsPath, Format: diskFormat(cfg.RootfsPath)})
	}
	if !cfg.named() {
		return nil
	}
	im, err := h.Store.GetImage(ctx, cfg.Image)
	if err != nil {
		return err
	}
	var meta imageMeta
	_ = json.Unmarshal(im.Info, &meta)
	base, format := meta.Rootfs, meta.Format
	if format == "" {
		format = "raw"
	}
	dev := fmt.Sprintf("/dev/vd%c", 'a'+len(mc.Disks))
	args := " " + wire.ParamRoot + "=" + dev
	switch cfg.DiskMode {
	case DiskShared:
		mc.Disks = append(mc.Disks, hypervisor.Disk{Path: base, Format: format, ReadOnly: true})
		args += " " + wire.ParamRootMode + "=ro"
	default:
		// The guest can write its whole disk, no more: the overlay grows
		// to the disk's size and qcow2's tables for it (the guest makes
		// no qcow2 snapshots). So the size is the bound, and it must fit.
		size := max(int64(cfg.DiskSizeMiB)<<20, im.Size)
		if err := CheckSpace(mc.Dir, overlayBound(size), fmt.Sprintf("the disk of VM %s (%s, which its overlay can grow to)", rec.Name, SizeString(size)),
			"give a smaller --disk-size (Config.DiskSizeMiB), or use --disk-mode shared"); err != nil {
			return err
		}
		t0 := time.Now()
		overlay := filepath.Join(mc.Dir, "disk.qcow2")
		if err := rootfs.CreateOverlay(ctx, base, format, overlay, int64(cfg.DiskSizeMiB)<<20); err != nil {
			return fmt.Errorf("%w: %w", errdefs.ErrInvalid, err)
		}
		cfg.Logger.Debug("disk overlay created", "path", overlay, "base", base, "took", time.Since(t0))
		mc.Disks = append(mc.Disks, hypervisor.Disk{Path: overlay, Format: "qcow2"})
		args += " " + wire.ParamRootMode + "=rw"
		if cfg.DiskSizeMiB > 0 && int64(cfg.DiskSizeMiB)<<20 > im.Size {
			args += " " + wire.ParamRootGrow + "=1"
		}
		if cfg.RetainDisk {
			dst := h.RetainedDisk(rec.Name, rec.ID)
			if err := os.WriteFile(filepath.Join(mc.Dir, retainMarker), []byte(dst), 0o600); err != nil {
				return err
			}
		}
	}
	mc.Cmdline += args
	return nil
}

func diskFormat(path string) string {
	if strings.HasSuffix(path, ".qcow2") {
		return "qcow2"
	}
	return "raw"
}

// overlayBound is the most a qcow2 overlay of a disk of size bytes takes
// on the host: the disk's data plus qcow2's tables (8 bytes of L2 table
// and 2 of refcount per 64 KiB cluster, a few clusters of header, L1 and
// refcount table), with room to spare.
func overlayBound(size int64) int64 { return size + size/1024 + 1<<20 }

// retainDisk moves a VM's overlay out of its folder before the folder is
// removed, when the VM was created with RetainDisk.
func retainDisk(dir string) error {
	if dir == "" {
		return nil
	}
	dst, err := os.ReadFile(filepath.Join(dir, retainMarker))
	if err != nil {
		return nil
	}
	src := filepath.Join(dir, "disk.qcow2")
	if _, err := os.Stat(src); err != nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(string(dst)), 0o755); err != nil {
		return fmt.Errorf("retain disk: %w", err)
	}
	if err := os.Rename(src, string(dst)); err != nil {
		return fmt.Errorf("retain disk: %w", err)
	}
	return nil
}
