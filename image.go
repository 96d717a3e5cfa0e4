package smolvm

import (
	"context"
	"io"

	"github.com/smolvm/smolvm/internal/engine"
)

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
	// is not cached; New then boots it by default (see KernelEnv).
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
	if home == "" {
		home = Home()
	}
	d, err := engine.Setup(ctx, home, engine.SetupOptions{KernelPath: opts.KernelPath, InstallPackages: opts.InstallPackages,
		Progress: opts.Progress, CachedOnly: opts.CachedOnly, NoWarm: opts.NoWarm, TunedKernel: opts.TunedKernel},
		func(ctx context.Context) error {
			if h == nil {
				var err error
				if h, err = OpenHost(home); err != nil {
					return err
				}
				defer h.Close()
			}
			return ensureWarm(ctx, h, Config{KernelPath: opts.KernelPath})
		})
	return (*SetupResult)(d), err
}

// AgentBinary finds the static guest agent: $SMOLVM_AGENT, smolvm-agent
// beside the running executable or in ../libexec/smolvm, or in PATH.
func AgentBinary() (string, error) { return engine.AgentBinary() }

// KernelEnv selects the default kernel: "stock" boots Debian's cloud kernel
// even when a tuned kernel is cached, "tuned" requires the tuned kernel, and
// unset (or anything else) boots the tuned kernel when one is cached and the
// stock kernel otherwise. Config.KernelPath wins over all of these.
const KernelEnv = "SMOLVM_KERNEL"
