package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm"
)

func newKernelCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "Build and inspect the tuned guest kernel",
		Long: `The tuned kernel is built from Debian's linux-source-6.1 with smolvm's own small
configuration: everything a sandbox needs is built in (no modules), and its
uncompressed vmlinux boots through PVH, about twice as fast as Debian's cloud
kernel under software emulation. Once built, new VMs boot it by default; set
SMOLVM_KERNEL=stock to boot Debian's cloud kernel instead.`,
	}
	cmd.AddCommand(newKernelBuildCmd(g), newKernelInfoCmd(g), newKernelConfigCmd())
	return cmd
}

func newKernelBuildCmd(g *globals) *cobra.Command {
	var jobs int
	var force, noInstall, verbose bool
	var workDir string
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build the tuned kernel (cached; a few minutes to half an hour)",
		Long: `Build the tuned guest kernel from Debian's linux-source-6.1 and cache it under
$SMOLVM_HOME/cache/kernel-tuned: 'make allnoconfig' with smolvm's config fragment
(everything a sandbox needs built in, no modules) and one edit to the source (the
APIC timer's rate as a boot option, so a boot under emulation skips 100 ms of
measuring it). As root on Debian, missing build dependencies
(linux-source-6.1 make gcc binutils bc bison flex perl xz-utils libelf-dev) are
installed with apt-get unless --no-install is given. A build for the installed
source version and this smolvm's configuration is reused unless --force. New VMs
boot it from then on (unless SMOLVM_KERNEL=stock), so the build ends by making
their warm snapshot, as 'smolvm setup' does.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts := smolvm.KernelBuildOptions{Jobs: jobs, Force: force, InstallPackages: !noInstall, WorkDir: workDir, Logger: g.log}
			if verbose {
				opts.Output = os.Stderr
			} else if term.IsTerminal(int(os.Stderr.Fd())) {
				opts.Progress = os.Stderr
			}
			start := time.Now()
			ti, err := g.h.BuildTunedKernel(cmd.Context(), opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "tuned kernel %s (%s %s) ready in %s\n", ti.Release, ti.SourcePackage, ti.SourceVersion, time.Since(start).Round(time.Second))
			fmt.Println(ti.Vmlinux)
			if ti.Default {
				// New VMs boot it now: their warm snapshot is of this kernel.
				if _, err := g.h.Setup(cmd.Context(), smolvm.SetupOptions{Progress: opts.Progress}); err != nil {
					g.log.Warn("no warm snapshot for the tuned kernel yet: VMs boot cold until 'smolvm setup' makes it", "err", err)
				}
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&jobs, "jobs", "j", 0, "parallel compile jobs (default: number of CPUs)")
	cmd.Flags().BoolVar(&force, "force", false, "rebuild even when cached")
	cmd.Flags().BoolVar(&noInstall, "no-install", false, "do not install missing build dependencies; only report them")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "show make's output instead of a progress bar")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "unpack and build in this folder and keep it (default: a temporary folder, removed)")
	return cmd
}

type kernelInfo struct {
	Cached        bool     `json:"cached"`
	Default       bool     `json:"default"` // new VMs boot it
	Vmlinux       string   `json:"vmlinux,omitempty"`
	BzImage       string   `json:"bzimage,omitempty"`
	Release       string   `json:"release,omitempty"`
	SourceVersion string   `json:"source_version,omitempty"`
	Built         string   `json:"built,omitempty"`
	BuildSeconds  float64  `json:"build_seconds,omitempty"`
	SourceEdits   []string `json:"source_edits,omitempty"`  // smolvm's edits to the source it has
	MissingEdits  []string `json:"missing_edits,omitempty"` // and those it was built without
	CanBuild      bool     `json:"can_build"`
	Missing       []string `json:"missing,omitempty"`
}

func newKernelInfoCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "info",
		Short: "Show the cached tuned kernel and whether new VMs boot it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var ki kernelInfo
			if ti, ok := g.h.TunedKernel(); ok {
				ki = kernelInfo{Cached: true, Vmlinux: ti.Vmlinux, BzImage: ti.BzImage, Release: ti.Release,
					SourceVersion: ti.SourceVersion, Built: ti.Built.Format(time.RFC3339), BuildSeconds: ti.BuildSeconds,
					SourceEdits: ti.SourceEdits, MissingEdits: ti.MissingEdits, Default: ti.Default}
			}
			ki.Missing = smolvm.KernelBuildProblems()
			ki.CanBuild = len(ki.Missing) == 0
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(ki)
			}
			printKernelInfo(os.Stdout, ki)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printKernelInfo(w io.Writer, ki kernelInfo) {
	if !ki.Cached {
		fmt.Fprintln(w, "tuned kernel: not built (new VMs boot Debian's cloud kernel); run 'smolvm kernel build'")
	} else {
		use := "yes"
		if !ki.Default {
			use = "no (" + smolvm.KernelEnv + "=stock)"
		}
		fmt.Fprintf(w, "tuned kernel: %s\nrelease:      %s (source %s)\nbuilt:        %s in %.0fs\ndefault:      %s\n",
			ki.Vmlinux, ki.Release, ki.SourceVersion, ki.Built, ki.BuildSeconds, use)
		edits := "none"
		if len(ki.SourceEdits) > 0 {
			edits = strings.Join(ki.SourceEdits, ", ")
		}
		if len(ki.MissingEdits) > 0 {
			edits += "; built without " + strings.Join(ki.MissingEdits, ", ") + " (an older smolvm): 'smolvm kernel build' makes a kernel with them"
		}
		fmt.Fprintf(w, "source edits: %s\n", edits)
	}
	for _, m := range ki.Missing {
		fmt.Fprintln(w, "missing for a build:", m)
	}
}

func newKernelConfigCmd() *cobra.Command {
	return &cobra.Command{
		Use:         "config",
		Annotations: map[string]string{noHost: "no state"},
		Short:       "Print the kernel configuration fragment applied over allnoconfig",
		Args:        cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := os.Stdout.Write(smolvm.KernelConfigFragment())
			return err
		},
	}
}
