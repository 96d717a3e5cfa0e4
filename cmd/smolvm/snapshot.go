package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newSnapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Save running VMs and start new VMs from them",
	}
	var asJSON bool
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List snapshots",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			sns, err := g.h.Snapshots(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(sns)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tSOURCE VM\tCPUS\tMEMORY\tSIZE\tCREATED")
			for _, s := range sns {
				name := s.Name
				if s.State != "" {
					name += " (" + s.State + ")"
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%dM\t%.1fM\t%s\n", name, s.SourceVM, s.VCPUs, s.MemoryMiB, float64(s.MemoryBytes+s.DiskBytes)/(1<<20), ago(s.Created))
			}
			return w.Flush()
		},
	}
	ls.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	create := &cobra.Command{
		Use:   "create VM NAME",
		Short: "Save a running VM's memory, device state and disk (it goes on running)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			in, err := vm.Snapshot(cmd.Context(), args[1])
			if err != nil {
				return err
			}
			fmt.Println(in.Name)
			return nil
		},
	}
	var name string
	var bootTimeout time.Duration
	restore := &cobra.Command{
		Use:   "restore SNAPSHOT [--name NEW]",
		Short: "Start a new persistent VM from a snapshot; print its id",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.h.Restore(cmd.Context(), args[0], smolvm.Config{Name: name, Persistent: true, Logger: g.log, BootTimeout: bootTimeout})
			if err != nil {
				return err
			}
			fmt.Println(vm.ID())
			return vm.Close()
		},
	}
	restore.Flags().StringVar(&name, "name", "", "name of the new VM")
	restore.Flags().DurationVar(&bootTimeout, "boot-timeout", 0, "how long to wait for the guest agent (default 90s)")
	rm := &cobra.Command{
		Use:     "rm SNAPSHOT...",
		Aliases: []string{"delete"},
		Short:   "Delete snapshots (refused while a running VM uses one)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var first error
			for _, n := range args {
				if err := g.h.DeleteSnapshot(cmd.Context(), n); err != nil {
					fmt.Fprintln(os.Stderr, "smolvm:", err)
					if first == nil {
						first = err
					}
				}
			}
			if first != nil {
				return &exitError{exitCode(first)}
			}
			return nil
		},
	}
	cmd.AddCommand(ls, create, restore, rm)
	return cmd
}

func newPauseCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "pause VM...",
		Short: "Freeze VMs' vCPUs (memory stays)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return eachVM(g, cmd, args, func(vm *smolvm.VM) error { return vm.Pause(cmd.Context()) })
		},
	}
}

func newResumeCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "resume VM...",
		Aliases: []string{"unpause"},
		Short:   "Resume paused VMs",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return eachVM(g, cmd, args, func(vm *smolvm.VM) error { return vm.Resume(cmd.Context()) })
		},
	}
}
