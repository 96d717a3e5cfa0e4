package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
)

// DefaultMemoryMiB is a VM's memory unless its config says otherwise.
const DefaultMemoryMiB = 512

// SetupOptions tune Setup (smolvm.SetupOptions documents them).
type SetupOptions struct {
	KernelPath                      string
	InstallPackages                 bool
	Progress                        io.Writer
	CachedOnly, NoWarm, TunedKernel bool
}

// SetupResult is the default image Setup prepared (smolvm.SetupResult
// documents it; same fields, in the same order).
type SetupResult struct{ Kernel, Initrd, KernelVersion, Fingerprint string }

// Setup prepares the host and the state folder home (see smolvm.Setup):
// host packages, the default image and, through warm, the warm snapshot.
// A tuned kernel that cannot be built leaves the rest set up, and the
// error says so along with the image.
func Setup(ctx context.Context, home string, opts SetupOptions, warm func(context.Context) error) (*SetupResult, error) {
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
		if err := jail.EnsureUser(); err != nil {
			return nil, err
		}
	}
	agent, err := AgentBinary()
	if err != nil {
		return nil, err
	}
	// A tuned kernel that cannot be built leaves the host set up with
	// Debian's kernel (the fallback), and the error says so at the end.
	var tunedErr error
	if opts.TunedKernel && opts.KernelPath == "" && !opts.CachedOnly {
		if _, err := BuildTunedKernel(ctx, image.KernelBuildOptions{
			CacheDir: filepath.Join(home, "cache"), InstallPackages: opts.InstallPackages, Progress: opts.Progress,
		}); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("tuned kernel: %w", err)
			}
			tunedErr = fmt.Errorf("tuned kernel: %w (setup went on with Debian's kernel, which new VMs boot until a tuned one is built)", err)
		}
	}
	d, err := setupImage(ctx, home, agent, opts, warm)
	if err != nil {
		return nil, errors.Join(err, tunedErr)
	}
	return &SetupResult{Kernel: d.Kernel, Initrd: d.Initrd, KernelVersion: d.KernelVersion, Fingerprint: d.Fingerprint}, tunedErr
}

// BuildTunedKernel is image.BuildTunedKernel; tests make it fail.
var BuildTunedKernel = image.BuildTunedKernel

// setupImage is Setup after the tuned kernel: the default image and the
// warm snapshot.
func setupImage(ctx context.Context, home, agent string, opts SetupOptions, warm func(context.Context) error) (*image.Default, error) {
	d, err := image.EnsureDefault(ctx, image.Options{
		CacheDir: filepath.Join(home, "cache"), AgentPath: agent, KernelPath: opts.KernelPath, Progress: opts.Progress,
		Tuned: opts.KernelPath == "" && UseTunedKernel(filepath.Join(home, "cache")),
	})
	if err != nil || opts.NoWarm || opts.CachedOnly {
		return d, err
	}
	// The warm snapshot's VM keeps its memory in a file in the state
	// folder (see smolvm's ensureWarm): on a file system without room for it, the
	// guest would die writing its memory. VMs boot cold instead.
	need := int64(DefaultMemoryMiB + 64)
	if free, err := FreeBytes(home); err == nil && free>>20 < need {
		slog.Default().Warn(fmt.Sprintf("no warm snapshot: %s has %d MiB free and the warm snapshot needs up to %d MiB; VMs boot cold until you free some space and run 'smolvm setup' again", home, free, need))
		return d, nil
	}
	if opts.Progress != nil {
		fmt.Fprintln(opts.Progress, "preparing the warm snapshot (one cold boot)…")
	}
	if err := warm(ctx); err != nil {
		return nil, err
	}
	return d, nil
}
