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
	var capacity capacityFlags
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
missing, stale or does not restore.

--max-vms and --max-memory set the host's capacity, kept in the host folder
($SMOLVM_HOST_DIR, else /var/lib/smolvm for root): a new VM in any state folder
is refused past them (0 restores the default, -1 is no limit; $SMOLVM_MAX_VMS,
$SMOLVM_MAX_MEMORY_MIB and create's flags of the same names override them).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := setCapacity(cmd, &capacity); err != nil {
				return err
			}
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
	capacity.register(cmd.Flags(), "new VMs")
	return cmd
}

// setCapacity keeps the host's limits that setup's flags give (only
// those given; the others stay), before the rest of setup.
func setCapacity(cmd *cobra.Command, f *capacityFlags) error {
	vmsSet, memSet := cmd.Flags().Changed("max-vms"), cmd.Flags().Changed("max-memory")
	if !vmsSet && !memSet {
		return nil
	}
	vms, mem, err := f.limits()
	if err != nil {
		return err
	}
	c, err := smolvm.ReadHostCapacity()
	if err != nil && (!vmsSet || !memSet) {
		return err
	}
	if vmsSet {
		c.MaxVMs = vms
	}
	if memSet {
		c.MaxMemoryMiB = mem
	}
	if err := smolvm.SetHostCapacity(c); err != nil {
		return err
	}
	maxVMs, maxMem, err := smolvm.Capacity()
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "capacity:  %s VMs, %s of guest memory, counted over every state folder (kept in %s)\n",
		limitText(maxVMs, ""), limitText(maxMem, " MiB"), smolvm.HostDir())
	return nil
}

// limitText shows a resolved limit (0: none).
func limitText(n int, unit string) string {
	if n == 0 {
		return "no limit of"
	}
	return fmt.Sprintf("at most %d%s", n, unit)
}
