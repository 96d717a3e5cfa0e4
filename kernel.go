package smolvm

import (
	"context"
	"io"
	"log/slog"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
)

// TunedKernel is a tuned guest kernel in a host's cache: built from
// Debian's linux-source with smolvm's configuration (everything a sandbox
// needs built in, no modules), it boots about twice as fast as Debian's
// cloud kernel under emulation. New VMs boot it once it is built, unless
// $SMOLVM_KERNEL is "stock" (see KernelEnv).
type TunedKernel struct {
	// Vmlinux is the kernel's ELF file, booted through PVH.
	Vmlinux string `json:"vmlinux"`
	// BzImage is the same kernel as a bzImage ("" when absent).
	BzImage string `json:"bzimage,omitempty"`
	// Release is the kernel's uname -r.
	Release       string `json:"release"`
	SourcePackage string `json:"source_package"`
	SourceVersion string `json:"source_version"`
	// Built is when the build ended, and BuildSeconds how long it took.
	Built        time.Time `json:"built"`
	BuildSeconds float64   `json:"build_seconds"`
	// SourceEdits are smolvm's edits to the source the kernel has, and
	// MissingEdits those of this smolvm it was built without (an older
	// smolvm built it: a new build adds them).
	SourceEdits  []string `json:"source_edits,omitempty"`
	MissingEdits []string `json:"missing_edits,omitempty"`
	// Default tells whether new VMs boot it ($SMOLVM_KERNEL is not
	// "stock").
	Default bool `json:"default"`
}

func tunedKernelOf(tk *engine.TunedKernel, err error) (*TunedKernel, error) {
	if err != nil {
		return nil, err
	}
	return (*TunedKernel)(tk), nil
}

// KernelBuildOptions tune Host.BuildTunedKernel.
type KernelBuildOptions struct {
	// Jobs is make's -j; 0 means the number of CPUs.
	Jobs int
	// Force rebuilds even when the kernel for this source and
	// configuration is cached.
	Force bool
	// InstallPackages installs missing build dependencies with apt-get
	// (root only); otherwise they are reported in the error.
	InstallPackages bool
	// WorkDir is where the source is unpacked and built, and kept; ""
	// means a temporary folder in the cache, removed afterwards.
	WorkDir string
	// Progress receives a progress bar (a terminal); nil is silent.
	Progress io.Writer
	// Output, when set, receives make's output as it comes.
	Output io.Writer
	// Logger receives logs; nil means slog.Default().
	Logger *slog.Logger
}

// BuildTunedKernel builds the tuned kernel into the host's cache, or
// returns the cached one for the installed source and this smolvm's
// configuration (a few minutes to half an hour). It does not make the
// warm snapshot of the new kernel: Setup does.
func (h *Host) BuildTunedKernel(ctx context.Context, opts KernelBuildOptions) (*TunedKernel, error) {
	return tunedKernelOf(h.eng.BuildTunedKernel(ctx, engine.KernelBuildOptions(opts)))
}

// TunedKernel returns the tuned kernel cached for this host, if one was
// built with this smolvm's configuration.
func (h *Host) TunedKernel() (*TunedKernel, bool) {
	tk, ok := h.eng.TunedKernel()
	return (*TunedKernel)(tk), ok
}

// KernelBuildProblems lists what this host lacks to build the tuned
// kernel (a tool or the source, with its Debian package); none means it
// can.
func KernelBuildProblems() []string { return engine.KernelBuildProblems() }

// KernelConfigFragment is the configuration the tuned kernel applies over
// the kernel's allnoconfig.
func KernelConfigFragment() []byte { return engine.KernelConfigFragment() }
