package smolvm

// Named disk images.
//
// An image other than "default" is an ext4 root disk under
// $SMOLVM_HOME/images/<name>/rootfs.img (raw, read-only, a hard link to
// the build cache entry when both are on one file system) with
// image.json beside it, recorded in the store (store.PutImage). It comes
// from Debian packages (BuildImage, mmdebstrap) or from an OCI / Docker
// image (ImportImage, go-containerregistry) and carries the guest agent at
// /usr/sbin/smolvm-agent.
//
// A VM of such an image boots the default kernel and initramfs with the
// disk as /dev/vda and smolvm.root=/dev/vda on the command line: the
// initramfs agent mounts it, switches root into it and re-executes itself
// there as PID 1 (see internal/agent/rootfs.go).
//
// Disk modes (Config.DiskMode):
//   - "isolated" (default): the VM writes to a qcow2 overlay in its VM
//     folder (disk.qcow2) whose backing file is the image, created in
//     milliseconds. Config.DiskSizeMiB makes the overlay larger than the
//     image and the guest grows its ext4 file system online at boot
//     (EXT4_IOC_RESIZE_FS, no resize2fs needed). The disk's size (the
//     image's, or DiskSizeMiB) bounds the overlay: a guest that writes its
//     whole disk grows it to that size and qcow2's tables (overlayBound), no
//     more, and a VM whose disk could not grow that far in its state
//     folder is refused. Config.RetainDisk keeps the
//     overlay when the VM is deleted: it is moved to
//     $SMOLVM_HOME/disks/<vm name>-<vm id>.qcow2 (still backed by the image).
//   - "shared": the image itself is attached read-only and mounted
//     read-only: the guest root is read-only (writes fail with EROFS); /tmp,
//     /run and /dev/shm are tmpfs and writable. Many VMs can share one image.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/rootfs"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/wire"
)

// Disk modes of Config.DiskMode.
const (
	DiskIsolated = "isolated"
	DiskShared   = "shared"
)

// DefaultImage is the name of the built-in image (kernel + initramfs).
const DefaultImage = "default"

// recipes are ready-made Debian images (see Recipes).
var recipes = map[string]BuildOptions{
	"python": {Suite: "bookworm", Packages: []string{"python3", "python3-pip", "python3-venv", "git", "curl", "ca-certificates"}},
	// browser: Debian's chromium built for headless use (the same source
	// as the chromium package, without GTK and the desktop stack), the
	// Liberation fonts (metric-compatible Arial, Times New Roman, Courier
	// New) and DejaVu (fontconfig's default); the UI translations but
	// en-US are removed. See browser.go.
	"browser": {Suite: "bookworm", Packages: []string{"chromium-headless-shell", "fonts-liberation", "fonts-dejavu-core", "ca-certificates"},
		Script: browserImageScript},
}

// Recipes returns the ready-made Debian images `smolvm image build NAME`
// builds when NAME is one of them and no packages are given, by name. The
// map is the caller's: changing it changes no recipe.
func Recipes() map[string]BuildOptions {
	out := make(map[string]BuildOptions, len(recipes))
	for n, r := range recipes {
		r.Packages = append([]string(nil), r.Packages...)
		out[n] = r
	}
	return out
}

// ImageInfo describes a named image.
type ImageInfo struct {
	Name         string    `json:"name"`
	Kind         string    `json:"kind"` // "initramfs", "debian" or "oci"
	Dir          string    `json:"dir"`
	Rootfs       string    `json:"rootfs,omitempty"` // the ext4 disk ("" for the default image)
	Format       string    `json:"format,omitempty"` // raw or qcow2
	Created      time.Time `json:"created"`
	Size         int64     `json:"size"`       // bytes the guest sees (initramfs: its size)
	DiskUsage    int64     `json:"disk_usage"` // bytes the files take on the host
	Source       string    `json:"source"`
	Digest       string    `json:"digest,omitempty"`
	Fingerprint  string    `json:"fingerprint,omitempty"`
	AgentVersion string    `json:"agent_version,omitempty"`
	AgentSHA256  string    `json:"agent_sha256,omitempty"`
	Packages     []string  `json:"packages,omitempty"`
	BuildTime    string    `json:"build_time,omitempty"`
	UsedBy       []string  `json:"used_by,omitempty"` // VMs (name (id)) that use it
	// Config is an OCI image's run config; nil for images without one.
	Config *ImageConfig `json:"config,omitempty"`
}

// ImageConfig is how an OCI image says its commands run, kept from its
// config when it is pulled or imported and applied as `docker run` does:
// every command starts with Env (under the sandbox's environment and the
// command's own), in WorkingDir (unless the command names a folder), as
// User (unless the command names one); `smolvm run` without a command
// runs Entrypoint + Cmd.
type ImageConfig struct {
	Env          []string `json:"env,omitempty"`
	WorkingDir   string   `json:"working_dir,omitempty"`
	User         string   `json:"user,omitempty"` // name, uid, name:group or uid:gid, resolved in the image
	Entrypoint   []string `json:"entrypoint,omitempty"`
	Cmd          []string `json:"cmd,omitempty"`
	ExposedPorts []string `json:"exposed_ports,omitempty"` // information only, e.g. "8080/tcp"
}

// Command returns what runs for args as docker's rule has it: with no
// args, Entrypoint + Cmd; otherwise Entrypoint + args (args replace Cmd).
// A non-nil entrypoint replaces the image's, and the image's Cmd with it.
func (c *ImageConfig) Command(entrypoint []string, args []string) []string {
	ep, cmd := []string(nil), []string(nil)
	if c != nil {
		ep, cmd = c.Entrypoint, c.Cmd
	}
	if entrypoint != nil {
		ep, cmd = entrypoint, nil
	}
	if len(args) > 0 {
		cmd = args
	}
	return append(slices.Clone(ep), cmd...)
}

func imageConfigOf(c *wire.ImageConfig) *ImageConfig {
	if c.Empty() {
		return nil
	}
	return &ImageConfig{Env: c.Env, WorkingDir: c.WorkingDir, User: c.User, Entrypoint: c.Entrypoint, Cmd: c.Cmd, ExposedPorts: c.ExposedPorts}
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

// BuildOptions describe a Debian image for BuildImage.
type BuildOptions struct {
	// Home is the state folder ("" = Home()); Host.BuildImage takes its own.
	Home     string    `json:"-"`
	Name     string    `json:"-"`
	Suite    string    `json:"suite,omitempty"`   // default bookworm
	Variant  string    `json:"variant,omitempty"` // minbase (default) or apt
	Packages []string  `json:"packages,omitempty"`
	Script   string    `json:"script,omitempty"` // run in the image (chroot) after the packages
	Mirror   string    `json:"mirror,omitempty"` // default: the host's apt mirror
	SizeMiB  int       `json:"size_mib,omitempty"`
	Progress io.Writer `json:"-"`
}

// ImportOptions describe an OCI or Docker image for ImportImage: Ref
// (registry) or File (OCI layout folder or tar, docker save tarball).
type ImportOptions struct {
	// Home is the state folder ("" = Home()); Host.ImportImage takes its own.
	Home     string
	Name     string // default: derived from Ref or File
	Ref      string
	File     string
	SizeMiB  int
	Progress io.Writer
}

func imagesDir(home string) string { return filepath.Join(home, "images") }

func checkImageName(name string) error {
	if name == DefaultImage {
		return fmt.Errorf("%w: %q is the built-in image", ErrInvalid, name)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: image name %q: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// BuildImage builds (or takes from the cache) a Debian image and records
// it under opts.Name. A Name listed in Recipes with no packages given
// builds that recipe. It needs root, mmdebstrap and e2fsprogs.
func BuildImage(ctx context.Context, opts BuildOptions) (*ImageInfo, error) {
	h, err := OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.BuildImage(ctx, opts)
}

func buildImage(ctx context.Context, st *store.Store, opts BuildOptions) (*ImageInfo, error) {
	if err := checkImageName(opts.Name); err != nil {
		return nil, err
	}
	if r, ok := recipes[opts.Name]; ok && len(opts.Packages) == 0 && opts.Script == "" {
		if opts.Suite == "" {
			opts.Suite = r.Suite
		}
		opts.Packages, opts.Script = r.Packages, r.Script
	}
	if opts.Suite == "" {
		opts.Suite = "bookworm"
	}
	if opts.SizeMiB < 0 {
		return nil, fmt.Errorf("%w: negative size", ErrInvalid)
	}
	for _, p := range opts.Packages {
		if p == "" || strings.ContainsAny(p, " ,'\"\\$;/") || strings.HasPrefix(p, "-") {
			return nil, fmt.Errorf("%w: package name %q", ErrInvalid, p)
		}
	}
	home := homeOf(st)
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	res, err := rootfs.BuildDebian(ctx, rootfs.DebianOptions{
		CacheDir: filepath.Join(home, "cache"), Suite: opts.Suite, Variant: opts.Variant, Packages: opts.Packages,
		Script: opts.Script, Mirror: opts.Mirror, Size: int64(opts.SizeMiB) << 20, AgentPath: agent, Progress: opts.Progress,
	})
	if err != nil {
		return nil, err
	}
	return installImage(ctx, st, opts.Name, res, opts)
}

// ImportImage turns an OCI or Docker image into a bootable disk image
// (layers flattened honouring whiteouts, agent injected) named opts.Name.
func ImportImage(ctx context.Context, opts ImportOptions) (*ImageInfo, error) {
	h, err := OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.ImportImage(ctx, opts)
}

func importImage(ctx context.Context, st *store.Store, opts ImportOptions) (*ImageInfo, error) {
	if (opts.Ref == "") == (opts.File == "") {
		return nil, fmt.Errorf("%w: give an image reference or a file", ErrInvalid)
	}
	if opts.Name == "" {
		opts.Name = defaultImportName(opts.Ref, opts.File)
	}
	if err := checkImageName(opts.Name); err != nil {
		return nil, err
	}
	home := homeOf(st)
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	res, err := rootfs.ImportOCI(ctx, rootfs.OCIOptions{CacheDir: filepath.Join(home, "cache"), Ref: opts.Ref, File: opts.File,
		Size: int64(opts.SizeMiB) << 20, AgentPath: agent, Progress: opts.Progress})
	if err != nil {
		return nil, err
	}
	return installImage(ctx, st, opts.Name, res, BuildOptions{SizeMiB: opts.SizeMiB})
}

func defaultImportName(ref, file string) string {
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
func installImage(ctx context.Context, st *store.Store, name string, res *rootfs.Result, opts BuildOptions) (*ImageInfo, error) {
	home := homeOf(st)
	if users, err := imageUsers(ctx, st, name); err != nil {
		return nil, err
	} else if len(users) > 0 {
		return nil, fmt.Errorf("image %q is %w by VM %s (their disks are backed by it): delete them first (smolvm rm, smolvm snapshot rm)", name, ErrInUse, strings.Join(users, ", "))
	}
	dir := filepath.Join(imagesDir(home), name)
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
	meta := imageMeta{Format: "raw", Rootfs: dst, Fingerprint: res.Fingerprint, AgentVersion: Version, Build: res.Info, Options: opts}
	mj, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "image.json"), mj, 0o644); err != nil {
		return nil, err
	}
	rec := &store.Image{Name: name, Dir: dir, Source: res.Info.Source, Digest: res.Digest, Size: res.Size, Info: mj}
	if err := st.PutImage(ctx, rec); err != nil {
		return nil, err
	}
	return imageInfo(ctx, st, rec)
}

// imageUsers lists the VMs (in any state: a stopped VM's overlay still
// needs its base) whose image is name, and the snapshots of such VMs
// ("snapshot NAME": their frozen disks are backed by it).
func imageUsers(ctx context.Context, st *store.Store, name string) ([]string, error) {
	vms, err := st.ListVMs(ctx)
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
	sns, err := st.ListSnapshots(ctx)
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

func imageInfo(ctx context.Context, st *store.Store, im *store.Image) (*ImageInfo, error) {
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
	users, err := imageUsers(ctx, st, im.Name)
	if err != nil {
		return nil, err
	}
	info.UsedBy = users
	info.Config = imageConfigOf(meta.Build.Config)
	return info, nil
}

// defaultImageInfo describes the built-in image when its kernel is
// already in the cache (nothing is downloaded for a listing).
func defaultImageInfo(ctx context.Context, st *store.Store, home string) *ImageInfo {
	cache := filepath.Join(home, "cache")
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
		Fingerprint: d.Fingerprint, Digest: "sha256:" + d.Fingerprint, AgentVersion: Version}
	if fi, err := os.Stat(d.Initrd); err == nil {
		info.Created, info.Size, info.DiskUsage = fi.ModTime(), fi.Size(), fi.Size()
	}
	if fi, err := os.Stat(d.Kernel); err == nil {
		info.DiskUsage += fi.Size()
	}
	info.UsedBy, _ = imageUsers(ctx, st, DefaultImage)
	return info
}

func listImages(ctx context.Context, st *store.Store) ([]*ImageInfo, error) {
	home := homeOf(st)
	var out []*ImageInfo
	if d := defaultImageInfo(ctx, st, home); d != nil {
		out = append(out, d)
	}
	ims, err := st.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	for _, im := range ims {
		info, err := imageInfo(ctx, st, im)
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

func inspectImage(ctx context.Context, st *store.Store, name string) (*ImageInfo, error) {
	home := homeOf(st)
	if name == DefaultImage {
		if d := defaultImageInfo(ctx, st, home); d != nil {
			return d, nil
		}
		return nil, fmt.Errorf("image %q: %w: run 'smolvm setup'", name, ErrNotFound)
	}
	im, err := st.GetImage(ctx, name)
	if err != nil {
		return nil, err
	}
	return imageInfo(ctx, st, im)
}

func removeImage(ctx context.Context, st *store.Store, home, name string) error {
	im, err := st.GetImage(ctx, name)
	if err != nil {
		return err
	}
	if users, err := imageUsers(ctx, st, name); err != nil {
		return err
	} else if len(users) > 0 {
		return fmt.Errorf("image %q is %w by VM %s: delete them first (smolvm rm, smolvm snapshot rm)", name, ErrInUse, strings.Join(users, ", "))
	}
	if err := st.DeleteImage(ctx, name); err != nil {
		return err
	}
	dir := im.Dir
	if dir == "" || filepath.Dir(dir) != imagesDir(home) {
		dir = filepath.Join(imagesDir(home), name)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// PruneReport lists what PruneImages removed.
type PruneReport struct {
	Images []string `json:"images"`
	Cache  []string `json:"cache"` // cache entries (disk fingerprints, Debian trees, build folders)
	Freed  int64    `json:"freed"` // bytes
}

func pruneImages(ctx context.Context, st *store.Store) (*PruneReport, error) {
	home := homeOf(st)
	rep := &PruneReport{}
	ims, err := st.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	keep := map[string]bool{}
	keepTrees := map[string]bool{}
	for _, im := range ims {
		users, err := imageUsers(ctx, st, im.Name)
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
		if err := removeImage(ctx, st, home, im.Name); err != nil {
			if errors.Is(err, ErrInUse) {
				continue
			}
			return rep, err
		}
		rep.Images = append(rep.Images, im.Name)
	}
	cache := filepath.Join(home, "cache")
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

// ParseSizeMiB reads a size such as 2G, 512M, 1.5GiB or 300 (MiB).
func ParseSizeMiB(s string) (int, error) {
	v, err := parseSize(s, 1<<20, "a number of MiB")
	return int((v + 1<<19) >> 20), err
}

// ParseSizeBytes reads a size like ParseSizeMiB, but a bare number is a
// number of bytes.
func ParseSizeBytes(s string) (int64, error) {
	return parseSize(s, 1, "a number of bytes")
}

// parseSize reads a size with an optional K, M, G or T suffix (powers of
// 1024, "B" or "iB" after it allowed) into bytes; a bare number counts in
// units of unit bytes.
func parseSize(s string, unit float64, bare string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	if t == "" {
		return 0, nil
	}
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	mult := unit
	for i, suffix := range []string{"K", "M", "G", "T"} {
		if strings.HasSuffix(t, suffix) {
			mult, t = float64(int64(1)<<(10*(i+1))), strings.TrimSuffix(t, suffix)
			break
		}
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
	if err != nil || v < 0 || v*mult > 1<<62 {
		return 0, fmt.Errorf("%w: size %q: use e.g. 2G, 512M or %s", ErrInvalid, s, bare)
	}
	return int64(v*mult + 0.5), nil
}

// useNamedImage checks the image cfg.Image names before a VM of it is
// created and records its name on the VM.
func useNamedImage(ctx context.Context, st *store.Store, cfg *Config, img *resolvedImage) error {
	if cfg.Image == "" || cfg.Image == DefaultImage {
		return nil
	}
	im, err := st.GetImage(ctx, cfg.Image)
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

// attachDisks adds the VM's disks to mc: Config.RootfsPath as given, or
// the named image's disk in the VM's disk mode, with the kernel command
// line that makes the guest switch its root to it.
func attachDisks(ctx context.Context, st *store.Store, cfg *Config, rec *store.VM, mc *hypervisor.MachineConfig) error {
	if cfg.RootfsPath != "" {
		mc.Disks = append(mc.Disks, hypervisor.Disk{Path: cfg.RootfsPath, Format: diskFormat(cfg.RootfsPath)})
	}
	if cfg.Image == "" || cfg.Image == DefaultImage {
		return nil
	}
	im, err := st.GetImage(ctx, cfg.Image)
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
		if err := checkSpace(mc.Dir, overlayBound(size), fmt.Sprintf("the disk of VM %s (%s, which its overlay can grow to)", rec.Name, sizeString(size)),
			"give a smaller --disk-size (Config.DiskSizeMiB), or use --disk-mode shared"); err != nil {
			return err
		}
		t0 := time.Now()
		overlay := filepath.Join(mc.Dir, "disk.qcow2")
		if err := rootfs.CreateOverlay(ctx, base, format, overlay, int64(cfg.DiskSizeMiB)<<20); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		cfg.Logger.Debug("disk overlay created", "path", overlay, "base", base, "took", time.Since(t0))
		mc.Disks = append(mc.Disks, hypervisor.Disk{Path: overlay, Format: "qcow2"})
		args += " " + wire.ParamRootMode + "=rw"
		if cfg.DiskSizeMiB > 0 && int64(cfg.DiskSizeMiB)<<20 > im.Size {
			args += " " + wire.ParamRootGrow + "=1"
		}
		if cfg.RetainDisk {
			dst := filepath.Join(homeOf(st), "disks", rec.Name+"-"+rec.ID+".qcow2")
			if err := os.WriteFile(filepath.Join(mc.Dir, retainMarker), []byte(dst), 0o600); err != nil {
				return err
			}
		}
	}
	mc.Cmdline += args
	return nil
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

func checkDiskConfig(c *Config) error {
	switch c.DiskMode {
	case "", DiskIsolated, DiskShared:
	default:
		return fmt.Errorf("%w: disk mode %q: use isolated or shared", ErrInvalid, c.DiskMode)
	}
	if c.DiskSizeMiB < 0 {
		return fmt.Errorf("%w: negative disk size", ErrInvalid)
	}
	named := c.Image != "" && c.Image != DefaultImage
	if !named && (c.DiskMode != "" || c.DiskSizeMiB != 0 || c.RetainDisk) {
		return fmt.Errorf("%w: disk mode, disk size and retain disk apply to disk images: give one (Config.Image, --image)", ErrInvalid)
	}
	if c.DiskMode == DiskShared && (c.DiskSizeMiB != 0 || c.RetainDisk) {
		return fmt.Errorf("%w: a shared disk is read-only: disk size and retain disk need the isolated mode", ErrInvalid)
	}
	if named && c.Image != "" && !nameRE.MatchString(c.Image) {
		return fmt.Errorf("%w: image name %q", ErrInvalid, c.Image)
	}
	return nil
}
