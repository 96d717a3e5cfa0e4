package engine

// Named disk images: see the smolvm package's images.go for what they are
// and how a VM attaches one (disks.go here).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/rootfs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/wire"
)

// DefaultImage is the name of the built-in image (kernel + initramfs).
const DefaultImage = "default"

// Disk modes (smolvm.Config.DiskMode).
const (
	DiskIsolated = "isolated"
	DiskShared   = "shared"
)

// ImageInfo describes an image; the smolvm package's ImageInfo is its
// documented twin.
type ImageInfo struct {
	Name, Kind, Dir, Rootfs, Format string
	Created                         time.Time
	Size, DiskUsage                 int64
	Source, Digest, Fingerprint     string
	AgentVersion, AgentSHA256       string
	Packages                        []string
	BuildTime                       string
	UsedBy                          []string
	Config                          *wire.ImageConfig
}

// BuildOptions describe a Debian image; their JSON is what image.json
// records of the build.
type BuildOptions struct {
	Suite    string    `json:"suite,omitempty"`
	Variant  string    `json:"variant,omitempty"`
	Packages []string  `json:"packages,omitempty"`
	Script   string    `json:"script,omitempty"`
	Mirror   string    `json:"mirror,omitempty"`
	SizeMiB  int       `json:"size_mib,omitempty"`
	Progress io.Writer `json:"-"`
}

// ImportOptions describe an OCI or Docker image: Ref (registry) or File.
type ImportOptions struct {
	Name, Ref, File string
	SizeMiB         int
	Progress        io.Writer
}

// PruneReport lists what PruneImages removed.
type PruneReport struct {
	Images, Cache []string
	Freed         int64
}

// imageMeta is what the store's Info column and image.json hold.
type imageMeta struct {
	Format       string       `json:"format"`
	Rootfs       string       `json:"rootfs"`
	Fingerprint  string       `json:"fingerprint"`
	AgentVersion string       `json:"agent_version"`
	Build        rootfs.Info  `json:"build"`
	Options      BuildOptions `json:"options"`
}

func (h *Host) imagesDir() string { return filepath.Join(h.Home, "images") }

// AgentBinary finds the static guest agent: $SMOLVM_AGENT, smolvm-agent
// beside the running executable or in ../libexec/smolvm, or in PATH.
func AgentBinary() (string, error) {
	if p := os.Getenv("SMOLVM_AGENT"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("SMOLVM_AGENT: %w", err)
		}
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		for _, p := range []string{filepath.Join(dir, "smolvm-agent"), filepath.Join(dir, "..", "libexec", "smolvm", "smolvm-agent")} {
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
		}
	}
	if p, err := exec.LookPath("smolvm-agent"); err == nil {
		return p, nil
	}
	return "", errors.New("guest agent binary smolvm-agent not found: build it with 'make build' (CGO_ENABLED=0 go build -tags grpcnotrace -o bin/smolvm-agent ./cmd/smolvm-agent) or set SMOLVM_AGENT")
}

// BuildImage builds (or takes from the cache) a Debian image and records
// it as name; the caller checked the name and options.
func (h *Host) BuildImage(ctx context.Context, name string, opts BuildOptions) (*ImageInfo, error) {
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	res, err := rootfs.BuildDebian(ctx, rootfs.DebianOptions{
		CacheDir: h.cacheDir(), Suite: opts.Suite, Variant: opts.Variant, Packages: opts.Packages,
		Script: opts.Script, Mirror: opts.Mirror, Size: int64(opts.SizeMiB) << 20, AgentPath: agent, Progress: opts.Progress,
	})
	if err != nil {
		return nil, err
	}
	return h.installImage(ctx, name, res, opts)
}

// ImportImage turns an OCI or Docker image into a bootable disk image
// named opts.Name; the caller checked the name and options.
func (h *Host) ImportImage(ctx context.Context, opts ImportOptions) (*ImageInfo, error) {
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	res, err := rootfs.ImportOCI(ctx, rootfs.OCIOptions{CacheDir: h.cacheDir(), Ref: opts.Ref, File: opts.File,
		Size: int64(opts.SizeMiB) << 20, AgentPath: agent, Progress: opts.Progress})
	if err != nil {
		return nil, err
	}
	return h.installImage(ctx, opts.Name, res, BuildOptions{SizeMiB: opts.SizeMiB})
}

// ImportName is the image name an import takes when none is given: the
// reference's last path element (tag or digest dropped), or the file's
// name, in the characters an image name may hold.
func ImportName(ref, file string) string {
	s := ref
	if s == "" {
		s = strings.TrimSuffix(filepath.Base(file), filepath.Ext(file))
	} else {
		if i := strings.LastIndex(s, "@"); i >= 0 {
			s = s[:i]
		}
		if i := strings.LastIndex(s, "/"); i >= 0 {
			s = s[i+1:]
		}
		s = strings.ReplaceAll(s, ":", "-")
	}
	var b strings.Builder
	for _, r := range s {
		if r < 128 && (r == '-' || r == '_' || r == '.' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			b.WriteRune(r)
		}
	}
	if b.Len() == 0 {
		return "imported"
	}
	return b.String()
}

// installImage links (or copies) a cached disk to images/<name>/rootfs.img
// and records it. An image of that name is replaced unless a VM uses it.
func (h *Host) installImage(ctx context.Context, name string, res *rootfs.Result, opts BuildOptions) (*ImageInfo, error) {
	if users, err := h.imageUsers(ctx, name); err != nil {
		return nil, err
	} else if len(users) > 0 {
		return nil, fmt.Errorf("image %q is %w by VM %s (their disks are backed by it): delete them first (smolvm rm, smolvm snapshot rm)", name, errdefs.ErrInUse, strings.Join(users, ", "))
	}
	dir := filepath.Join(h.imagesDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create image folder: %w", err)
	}
	dst := filepath.Join(dir, "rootfs.img")
	tmp := dst + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Link(res.Path, tmp); err != nil {
		out, cerr := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", res.Path, tmp).CombinedOutput()
		if cerr != nil {
			return nil, fmt.Errorf("copy the disk into %s: %w: %s", dir, cerr, strings.TrimSpace(string(out)))
		}
		_ = os.Chmod(tmp, 0o444)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return nil, err
	}
	meta := imageMeta{Format: "raw", Rootfs: dst, Fingerprint: res.Fingerprint, AgentVersion: h.Version, Build: res.Info, Options: opts}
	mj, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "image.json"), mj, 0o644); err != nil {
		return nil, err
	}
	rec := &store.Image{Name: name, Dir: dir, Source: res.Info.Source, Digest: res.Digest, Size: res.Size, Info: mj}
	if err := h.Store.PutImage(ctx, rec); err != nil {
		return nil, err
	}
	return h.imageInfo(ctx, rec)
}

// imageUsers lists the VMs (in any state: a stopped VM's overlay still
// needs its base) whose image is name, and the snapshots of such VMs
// ("snapshot NAME": their frozen disks are backed by it).
func (h *Host) imageUsers(ctx context.Context, name string) ([]string, error) {
	vms, err := h.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, v := range vms {
		if v.Image == name {
			out = append(out, v.Name+" ("+v.ID+")")
		}
	}
	if name == DefaultImage {
		return out, nil
	}
	sns, err := h.Store.ListSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	for _, sn := range sns {
		var info struct {
			Image string `json:"image"`
		}
		if json.Unmarshal(sn.Info, &info) == nil && info.Image == name {
			out = append(out, "snapshot "+sn.Name)
		}
	}
	return out, nil
}

func (h *Host) imageInfo(ctx context.Context, im *store.Image) (*ImageInfo, error) {
	var meta imageMeta
	if len(im.Info) > 0 {
		_ = json.Unmarshal(im.Info, &meta)
	}
	info := &ImageInfo{Name: im.Name, Kind: meta.Build.Kind, Dir: im.Dir, Rootfs: meta.Rootfs, Format: meta.Format,
		Created: im.Created, Size: im.Size, Source: im.Source, Digest: im.Digest, Fingerprint: meta.Fingerprint,
		AgentVersion: meta.AgentVersion, AgentSHA256: meta.Build.AgentSHA256, Packages: meta.Build.Packages, BuildTime: meta.Build.BuildTime}
	if info.Rootfs != "" {
		info.DiskUsage = rootfs.DiskUsage(info.Rootfs)
	}
	users, err := h.imageUsers(ctx, im.Name)
	if err != nil {
		return nil, err
	}
	info.UsedBy = users
	info.Config = meta.Build.Config
	return info, nil
}

// defaultImageInfo describes the built-in image when its kernel is
// already in the cache (nothing is downloaded for a listing).
func (h *Host) defaultImageInfo(ctx context.Context) *ImageInfo {
	cache := h.cacheDir()
	if _, err := os.Stat(filepath.Join(cache, "kernel", "current")); err != nil {
		return nil
	}
	agent, err := AgentBinary()
	if err != nil {
		return nil
	}
	d, err := image.EnsureDefault(ctx, image.Options{CacheDir: cache, AgentPath: agent})
	if err != nil {
		return nil
	}
	info := &ImageInfo{Name: DefaultImage, Kind: "initramfs", Dir: filepath.Dir(d.Initrd), Source: "builtin: " + d.KernelVersion + " + busybox + agent",
		Fingerprint: d.Fingerprint, Digest: "sha256:" + d.Fingerprint, AgentVersion: h.Version}
	if fi, err := os.Stat(d.Initrd); err == nil {
		info.Created, info.Size, info.DiskUsage = fi.ModTime(), fi.Size(), fi.Size()
	}
	if fi, err := os.Stat(d.Kernel); err == nil {
		info.DiskUsage += fi.Size()
	}
	info.UsedBy, _ = h.imageUsers(ctx, DefaultImage)
	return info
}

// Images returns the default image (when set up) and every named image.
func (h *Host) Images(ctx context.Context) ([]*ImageInfo, error) {
	var out []*ImageInfo
	if d := h.defaultImageInfo(ctx); d != nil {
		out = append(out, d)
	}
	ims, err := h.Store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	for _, im := range ims {
		info, err := h.imageInfo(ctx, im)
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

// InspectImage describes one image; an unknown name wraps errdefs.ErrNotFound.
func (h *Host) InspectImage(ctx context.Context, name string) (*ImageInfo, error) {
	if name == DefaultImage {
		if d := h.defaultImageInfo(ctx); d != nil {
			return d, nil
		}
		return nil, fmt.Errorf("image %q: %w: run 'smolvm setup'", name, errdefs.ErrNotFound)
	}
	im, err := h.Store.GetImage(ctx, name)
	if err != nil {
		return nil, err
	}
	return h.imageInfo(ctx, im)
}

// RemoveImage deletes a named image, unless a VM or snapshot uses it.
func (h *Host) RemoveImage(ctx context.Context, name string) error {
	im, err := h.Store.GetImage(ctx, name)
	if err != nil {
		return err
	}
	if users, err := h.imageUsers(ctx, name); err != nil {
		return err
	} else if len(users) > 0 {
		return fmt.Errorf("image %q is %w by VM %s: delete them first (smolvm rm, smolvm snapshot rm)", name, errdefs.ErrInUse, strings.Join(users, ", "))
	}
	if err := h.Store.DeleteImage(ctx, name); err != nil {
		return err
	}
	dir := im.Dir
	if dir == "" || filepath.Dir(dir) != h.imagesDir() {
		dir = filepath.Join(h.imagesDir(), name)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// PruneImages removes the named images no VM uses, then the cached disks
// and Debian trees no remaining image was built from, and leftovers of
// interrupted builds.
func (h *Host) PruneImages(ctx context.Context) (*PruneReport, error) {
	rep := &PruneReport{}
	ims, err := h.Store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	keep := map[string]bool{}
	keepTrees := map[string]bool{}
	for _, im := range ims {
		users, err := h.imageUsers(ctx, im.Name)
		if err != nil {
			return nil, err
		}
		var meta imageMeta
		_ = json.Unmarshal(im.Info, &meta)
		if len(users) > 0 {
			keep[meta.Fingerprint] = true
			keepTrees[strings.Join(meta.Build.Packages, ",")+"|"+meta.Build.Suite] = true
			continue
		}
		rep.Freed += rootfs.DiskUsage(meta.Rootfs)
		if err := h.RemoveImage(ctx, im.Name); err != nil {
			if errors.Is(err, errdefs.ErrInUse) {
				continue
			}
			return rep, err
		}
		rep.Images = append(rep.Images, im.Name)
	}
	cache := h.cacheDir()
	for _, fp := range rootfs.CacheEntries(cache) {
		if keep[fp] {
			continue
		}
		p := rootfs.CachePath(cache, fp)
		rep.Freed += rootfs.DiskUsage(p)
		if err := rootfs.RemoveCacheEntry(cache, fp); err != nil {
			return rep, err
		}
		rep.Cache = append(rep.Cache, filepath.Base(p))
	}
	// Debian trees are the expensive part of a build: keep them while an
	// image is in use (any of them may be rebuilt with a new agent).
	if len(keepTrees) == 0 {
		trees, _ := filepath.Glob(filepath.Join(cache, "rootfs", "debian-*.tar"))
		for _, t := range trees {
			rep.Freed += rootfs.DiskUsage(t)
			if err := os.Remove(t); err == nil {
				rep.Cache = append(rep.Cache, filepath.Base(t))
			}
		}
	}
	for _, p := range rootfs.RemoveStaleBuilds(cache) {
		rep.Cache = append(rep.Cache, filepath.Base(p))
	}
	sort.Strings(rep.Cache)
	return rep, nil
}
