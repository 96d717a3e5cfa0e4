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
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
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

// buildOptions checks a build's name and options, fills in a recipe
// and the suite, and turns them into the engine's.
func buildOptions(opts BuildOptions) (engine.BuildOptions, error) {
	if err := checkImageName(opts.Name); err != nil {
		return engine.BuildOptions{}, err
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
		return engine.BuildOptions{}, fmt.Errorf("%w: negative size", ErrInvalid)
	}
	for _, p := range opts.Packages {
		if p == "" || strings.ContainsAny(p, " ,'\"\\$;/") || strings.HasPrefix(p, "-") {
			return engine.BuildOptions{}, fmt.Errorf("%w: package name %q", ErrInvalid, p)
		}
	}
	return engine.BuildOptions{Suite: opts.Suite, Variant: opts.Variant, Packages: opts.Packages, Script: opts.Script,
		Mirror: opts.Mirror, SizeMiB: opts.SizeMiB, Progress: opts.Progress}, nil
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

// importOptions checks an import's options, names it when it has no
// name, and turns them into the engine's.
func importOptions(opts ImportOptions) (engine.ImportOptions, error) {
	if (opts.Ref == "") == (opts.File == "") {
		return engine.ImportOptions{}, fmt.Errorf("%w: give an image reference or a file", ErrInvalid)
	}
	if opts.Name == "" {
		opts.Name = engine.ImportName(opts.Ref, opts.File)
	}
	if err := checkImageName(opts.Name); err != nil {
		return engine.ImportOptions{}, err
	}
	return engine.ImportOptions{Name: opts.Name, Ref: opts.Ref, File: opts.File, SizeMiB: opts.SizeMiB, Progress: opts.Progress}, nil
}

// imageInfoOf is the engine's description of an image in the API's types.
func imageInfoOf(in *engine.ImageInfo, err error) (*ImageInfo, error) {
	if err != nil {
		return nil, err
	}
	return &ImageInfo{Name: in.Name, Kind: in.Kind, Dir: in.Dir, Rootfs: in.Rootfs, Format: in.Format, Created: in.Created,
		Size: in.Size, DiskUsage: in.DiskUsage, Source: in.Source, Digest: in.Digest, Fingerprint: in.Fingerprint,
		AgentVersion: in.AgentVersion, AgentSHA256: in.AgentSHA256, Packages: in.Packages, BuildTime: in.BuildTime,
		UsedBy: in.UsedBy, Config: imageConfigOf(in.Config)}, nil
}

// PruneReport lists what PruneImages removed.
type PruneReport struct {
	Images []string `json:"images"`
	Cache  []string `json:"cache"` // cache entries (disk fingerprints, Debian trees, build folders)
	Freed  int64    `json:"freed"` // bytes
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
