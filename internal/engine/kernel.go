package engine

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/smolvm/smolvm/internal/image"
)

// TunedKernel describes the tuned kernel of a host (smolvm.TunedKernel
// documents it; same fields, in the same order).
type TunedKernel struct {
	Vmlinux, BzImage                      string
	Release, SourcePackage, SourceVersion string
	Built                                 time.Time
	BuildSeconds                          float64
	SourceEdits, MissingEdits             []string
	Default                               bool
}

func tunedKernelOf(ti *image.TunedKernelInfo) *TunedKernel {
	return &TunedKernel{Vmlinux: ti.Vmlinux, BzImage: ti.BzImage, Release: ti.Release, SourcePackage: ti.SourcePackage,
		SourceVersion: ti.SourceVersion, Built: ti.Built, BuildSeconds: ti.BuildSeconds, SourceEdits: ti.SourceEdits,
		MissingEdits: ti.MissingEdits(), Default: os.Getenv(KernelEnv) != "stock"}
}

// KernelBuildOptions tune BuildTunedKernel (smolvm.KernelBuildOptions
// documents them).
type KernelBuildOptions struct {
	Jobs                   int
	Force, InstallPackages bool
	WorkDir                string
	Progress, Output       io.Writer
	Logger                 *slog.Logger
}

// BuildTunedKernel builds the tuned kernel into the host's cache, unless
// a current one is there (or opts.Force).
func (h *Host) BuildTunedKernel(ctx context.Context, opts KernelBuildOptions) (*TunedKernel, error) {
	ti, err := image.EnsureTunedKernel(ctx, image.KernelBuildOptions{
		CacheDir: h.cacheDir(), Jobs: opts.Jobs, Force: opts.Force, InstallPackages: opts.InstallPackages,
		WorkDir: opts.WorkDir, Progress: opts.Progress, Output: opts.Output, Logger: opts.Logger,
	})
	if err != nil {
		return nil, err
	}
	return tunedKernelOf(ti), nil
}

// TunedKernel describes the host's cached tuned kernel, if there is one.
func (h *Host) TunedKernel() (*TunedKernel, bool) {
	ti, ok := image.LookupTunedKernel(h.cacheDir())
	if !ok {
		return nil, false
	}
	return tunedKernelOf(ti), true
}

// KernelBuildProblems lists what this host lacks to build the tuned
// kernel.
func KernelBuildProblems() []string {
	var out []string
	for _, p := range image.KernelBuildProblems() {
		out = append(out, p.String())
	}
	return out
}

// KernelConfigFragment is the kernel configuration the tuned kernel is
// built with.
func KernelConfigFragment() []byte { return image.KernelConfigFragment() }
