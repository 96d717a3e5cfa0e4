package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

// eachVM runs fn on every named VM, reporting failures and going on.
func eachVM(g *globals, cmd *cobra.Command, refs []string, fn func(vm *smolvm.VM) error) error {
	var errs []error
	for _, ref := range refs {
		vm, err := g.open(cmd.Context(), ref)
		if err == nil {
			err = fn(vm)
			err = errors.Join(err, vm.Close())
		}
		if err != nil {
			errs = append(errs, err)
			fmt.Fprintln(os.Stderr, "smolvm:", err)
		}
	}
	if len(errs) > 0 {
		return &exitError{exitCode(errs[0])}
	}
	return nil
}

func newStartCmd(g *globals) *cobra.Command {
	var capacity capacityFlags
	cmd := &cobra.Command{
		Use:   "start VM...",
		Short: "Boot stopped VMs again",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vms, memMiB, err := capacity.limits()
			if err != nil {
				return err
			}
			opts := smolvm.StartOptions{MaxVMs: vms, MaxMemoryMiB: memMiB}
			return eachVM(g, cmd, args, func(vm *smolvm.VM) error {
				if err := vm.StartWith(cmd.Context(), opts); err != nil {
					return err
				}
				fmt.Println(vm.ID())
				return nil
			})
		},
	}
	capacity.register(cmd.Flags(), "the start")
	return cmd
}

func newStopCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "stop VM...",
		Short: "Stop VMs (the guest powers off; its state folder stays)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return eachVM(g, cmd, args, func(vm *smolvm.VM) error {
				if force {
					return vm.Kill(cmd.Context())
				}
				return vm.Stop(cmd.Context())
			})
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill at once, without a guest shutdown")
	return cmd
}

func newRmCmd(g *globals) *cobra.Command {
	var force, all bool
	cmd := &cobra.Command{
		Use:     "rm [-f] VM... | rm --all",
		Aliases: []string{"delete", "remove"},
		Short:   "Delete VMs and everything they hold",
		RunE: func(cmd *cobra.Command, args []string) error {
			if all {
				if len(args) > 0 {
					return fmt.Errorf("%w: give VM names or --all, not both", smolvm.ErrInvalid)
				}
				vms, err := g.h.List(cmd.Context())
				if err != nil {
					return err
				}
				for _, v := range vms {
					args = append(args, v.ID)
				}
				force = true
			} else if len(args) == 0 {
				return fmt.Errorf("%w: name the VMs to delete, or use --all", smolvm.ErrInvalid)
			}
			return eachVM(g, cmd, args, func(vm *smolvm.VM) error {
				in, err := vm.Info(cmd.Context())
				if err != nil {
					return err
				}
				if !force && (in.State == smolvm.StateRunning || in.State == smolvm.StatePaused || in.State == smolvm.StateUnresponsive) {
					return fmt.Errorf("%w: VM %s is %s: stop it first or use 'smolvm rm -f %s'", smolvm.ErrInUse, in.Name, in.State, in.Name)
				}
				return vm.Delete(cmd.Context())
			})
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "delete running VMs too")
	cmd.Flags().BoolVar(&all, "all", false, "delete every VM")
	return cmd
}

func newCleanupCmd(g *globals) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "cleanup [--all]",
		Short: "Remove VMs whose processes died, and leftovers of crashes",
		Long: `Remove every VM whose supervisor or hypervisor died (state row, folder, sockets,
disks, leases, a stray QEMU process) and state folders no VM owns. With --all,
remove every VM, running ones included.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			removed, err := g.h.Cleanup(cmd.Context(), smolvm.CleanupOptions{All: all})
			for _, id := range removed {
				fmt.Println("removed", id)
			}
			if len(removed) == 0 && err == nil {
				fmt.Fprintln(os.Stderr, "nothing to clean up")
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "remove every VM, running ones included")
	return cmd
}
