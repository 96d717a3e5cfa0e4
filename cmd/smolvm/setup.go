package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm"
)

func newSetupCmd(g *globals) *cobra.Command {
	var kernel string
	var noInstall, tuned, noWarm bool
	cmd := &cobra.Command{
		Use:   "setup",
		Short: "Install host packages and build the default image (idempotent)",
		Long: `Prepare this host for smolvm: install missing host packages with apt-get (when
run as root on Debian or Ubuntu; otherwise print what to install), fetch Debian's
cloud kernel, build the initramfs with busybox and the guest agent, and make the
warm snapshot that new VMs of the default shape restore instead of booting (one
cold boot; it needs about 600 MiB free in the state folder while it is made).
Safe to run again: finished steps are cached under the state folder, and the
warm snapshot is checked by restoring it (0.1 s) and made anew only when it is
missing, stale or does not restore.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var progress *os.File
			if term.IsTerminal(int(os.Stderr.Fd())) {
				progress = os.Stderr
			}
			opts := smolvm.SetupOptions{KernelPath: kernel, InstallPackages: !noInstall, TunedKernel: tuned, NoWarm: noWarm}
			if progress != nil {
				opts.Progress = progress
			}
			d, err := g.h.Setup(cmd.Context(), opts)
			if d == nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "kernel:    %s (%s)\ninitramfs: %s\nready: try 'smolvm run -- uname -a'\n", d.Kernel, d.KernelVersion, d.Initrd)
			return err // a tuned kernel that could not be built: the rest is set up
		},
	}
	cmd.Flags().StringVar(&kernel, "kernel", "", "use this kernel instead of Debian's cloud kernel")
	cmd.Flags().BoolVar(&tuned, "tuned-kernel", false, "also build the tuned kernel (see 'smolvm kernel build'); new VMs then boot it")
	cmd.Flags().BoolVar(&noInstall, "no-install", false, "do not install host packages; only check for them")
	cmd.Flags().BoolVar(&noWarm, "no-warm", false, "make no warm snapshot (new VMs boot cold)")
	return cmd
}
