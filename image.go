package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
)

// resolvedImage is the kernel and initrd a VM boots.
type resolvedImage struct {
	name        string
	kernel      string
	initrd      string
	fingerprint string
	tuned       bool // the tuned kernel: everything built in, booted through PVH
}

// SetupOptions tune Setup.
type SetupOptions struct {
	// Home is the state folder ("" = Home()); Host.Setup takes its own.
	Home string
	// KernelPath uses this kernel instead of Debian's cloud kernel.
	KernelPath string
	// InstallPackages installs missing host packages with apt-get (root).
	InstallPackages bool
	// Progress receives progress bars and messages; nil is silent.
	Progress io.Writer
	// CachedOnly fails instead of downloading or building anything.
	CachedOnly bool
	// NoWarm skips the warm snapshot that lets New restore instead of boot.
	NoWarm bool
	// TunedKernel builds the tuned kernel (image.BuildTunedKernel) when it
	// is not cached; New then boots it by default (see useTunedKernel).
	TunedKernel bool
}

// SetupResult describes the built-in image (DefaultImage) Setup prepared:
// the kernel and initramfs that VMs boot unless Config names another image.
type SetupResult struct {
	// Kernel is the kernel's path: a PVH vmlinux or a bzImage.
	Kernel string `json:"kernel"`
	// Initrd is the initramfs's path (with the guest agent).
	Initrd string `json:"initrd"`
	// KernelVersion is the kernel's release, e.g. 6.1.0-56-cloud-amd64.
	KernelVersion string `json:"kernel_version"`
	// Fingerprint is a hex sha256 over everything that went into Kernel
	// and Initrd; a warm snapshot restores only for its fingerprint.
	Fingerprint string `json:"fingerprint"`
}

func setupResultOf(d *image.Default) *SetupResult {
	if d == nil {
		return nil
	}
	return &SetupResult{Kernel: d.Kernel, Initrd: d.Initrd, KernelVersion: d.KernelVersion, Fingerprint: d.Fingerprint}
}

// Setup prepares the host: host packages (when asked), the default kernel
// and the initramfs with the guest agent. It is idempotent and fast when
// everything is in place. When the tuned kernel it was asked for cannot be
// built (no source package or compiler, a failed build), it sets the rest up
// with Debian's kernel and returns the image together with an error that
// says so.
func Setup(ctx context.Context, opts SetupOptions) (*SetupResult, error) {
	return setup(ctx, nil, opts.Home, opts)
}

// setup is Setup in home, through h when it is set (else a Host is opened
// only for the warm snapshot: a setup that checks, or makes no snapshot,
// opens no store).
func setup(ctx context.Context, h *Host, home string, opts SetupOptions) (*SetupResult, error) {
	if opts.InstallPackages {
		if err := image.InstallHostPackages(ctx, opts.Progress); err != nil {
			return nil, err
		}
	} else {
		var probs []image.Problem
		for _, p := range image.CheckHost(ctx) {
			if !p.Optional {
				probs = append(probs, p)
			}
		}
		if len(probs) > 0 {
			return nil, fmt.Errorf("host is missing: %v: run 'smolvm setup' as root", probs)
		}
	}
	if os.Geteuid() == 0 && !opts.CachedOnly {
		// QEMU runs as this user (see internal/jail).
		if err := errors.Join(jail.EnsureUser(), jail.EnsureIDs()); err != nil {
			return nil, err
		}
	}
	if home == "" {
		home = Home()
	}
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	// A tuned kernel that cannot be built leaves the host set up with
	// Debian's kernel (the fallback), and the error says so at the end.
	var tunedErr error
	if opts.TunedKernel && opts.KernelPath == "" && !opts.CachedOnly {
		if _, err := buildTunedKernel(ctx, image.KernelBuildOptions{
			CacheDir: filepath.Join(home, "cache"), InstallPackages: opts.InstallPackages, Progress: opts.Progress,
		}); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("tuned kernel: %w", err)
			}
			tunedErr = fmt.Errorf("tuned kernel: %w (setup went on with Debian's kernel, which new VMs boot until a tuned one is built)", err)
		}
	}
	d, err := setupImage(ctx, h, home, agent, opts)
	if err != nil {
		return nil, errors.Join(err, tunedErr)
	}
	return setupResultOf(d), tunedErr
}

// buildTunedKernel is image.BuildTunedKernel; tests make it fail.
var buildTunedKernel = image.BuildTunedKernel

// setupImage is Setup after the tuned kernel: the default image and the
// warm snapshot.
func setupImage(ctx context.Context, h *Host, home, agent string, opts SetupOptions) (*image.Default, error) {
	d, err := image.EnsureDefault(ctx, image.Options{
		CacheDir: filepath.Join(home, "cache"), AgentPath: agent, KernelPath: opts.KernelPath, Progress: opts.Progress,
		Tuned: opts.KernelPath == "" && useTunedKernel(filepath.Join(home, "cache")),
	})
	if err != nil || opts.NoWarm || opts.CachedOnly {
		return d, err
	}
	// The warm snapshot's VM keeps its memory in a file in the state
	// folder (see ensureWarm): on a file system without room for it, the
	// guest would die writing its memory. VMs boot cold instead.
	need := int64(defaultMemoryMiB + 64)
	if free, err := freeBytes(home); err == nil && free>>20 < need {
		slog.Default().Warn(fmt.Sprintf("no warm snapshot: %s has %d MiB free and the warm snapshot needs up to %d MiB; VMs boot cold until you free some space and run 'smolvm setup' again", home, free, need))
		return d, nil
	}
	if opts.Progress != nil {
		fmt.Fprintln(opts.Progress, "preparing the warm snapshot (one cold boot)…")
	}
	if h == nil {
		if h, err = OpenHost(home); err != nil {
			return nil, err
		}
		defer h.Close()
	}
	if err := ensureWarm(ctx, h, Config{KernelPath: opts.KernelPath}); err != nil {
		return nil, err
	}
	return d, nil
}

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

func resolveImage(ctx context.Context, home string, cfg *Config) (*resolvedImage, error) {
	if cfg.KernelPath != "" && cfg.InitrdPath != "" {
		return &resolvedImage{name: "custom", kernel: cfg.KernelPath, initrd: cfg.InitrdPath}, nil
	}
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	cache := filepath.Join(home, "cache")
	tuned := cfg.KernelPath == "" && useTunedKernel(cache)
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

// KernelEnv selects the default kernel: "stock" boots Debian's cloud kernel
// even when a tuned kernel is cached, "tuned" requires the tuned kernel, and
// unset (or anything else) boots the tuned kernel when one is cached and the
// stock kernel otherwise. Config.KernelPath wins over all of these.
const KernelEnv = "SMOLVM_KERNEL"

// useTunedKernel reports whether New boots the tuned kernel cached under
// cacheDir: it boots about twice as fast as the stock kernel, so a host that
// built it ('smolvm kernel build' or 'smolvm setup --tuned-kernel') uses it.
func useTunedKernel(cacheDir string) bool {
	if os.Getenv(KernelEnv) == "stock" {
		return false
	}
	_, ok := image.TunedKernel(cacheDir)
	return ok
}
