package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newListCmd(g *globals) *cobra.Command {
	var asJSON, quiet bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list", "ps"},
		Short:   "List VMs",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vms, err := g.h.List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(vms)
			}
			if quiet {
				for _, v := range vms {
					fmt.Println(v.ID)
				}
				return nil
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tNAME\tSTATE\tIMAGE\tCPUS\tMEMORY\tCREATED\tREASON")
			for _, v := range vms {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%dM\t%s\t%s\n", v.ID, v.Name, v.State, v.Image, v.VCPUs, v.MemoryMiB,
					ago(v.Created), v.Reason)
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print ids only")
	return cmd
}

func ago(t time.Time) string {
	d := time.Since(t).Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return t.Format("2006-01-02")
}

func newInfoCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "info VM",
		Aliases: []string{"inspect"},
		Short:   "Show a VM's state, settings and phase timings",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// List first, so a VM whose supervisor died shows as failed.
			if _, err := g.h.List(cmd.Context()); err != nil {
				return err
			}
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			in, err := vm.Info(cmd.Context())
			if err != nil {
				return err
			}
			netInfo, _ := vm.Network(cmd.Context())
			if asJSON {
				return printJSON(struct {
					*smolvm.Info
					Network *smolvm.NetworkInfo `json:"network,omitempty"`
				}{in, netInfo})
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			row := func(k string, v any) { fmt.Fprintf(w, "%s:\t%v\n", k, v) }
			row("ID", in.ID)
			row("Name", in.Name)
			row("State", strings.TrimSpace(string(in.State)+" "+paren(in.Reason)))
			row("Image", in.Image)
			if in.Snapshot != "" {
				how := ""
				if in.Prelaunched {
					how = " (into a QEMU started ahead of time)"
				}
				row("Restored from", in.Snapshot+how)
			}
			row("CPUs", in.VCPUs)
			row("Memory", fmt.Sprintf("%d MiB", in.MemoryMiB))
			row("Accel", in.Accel)
			row("Channel", in.Channel)
			row("Persistent", in.Persistent)
			row("Created", in.Created.Format(time.RFC3339))
			row("Dir", in.Dir)
			if in.SupervisorPID != 0 {
				row("Supervisor PID", in.SupervisorPID)
				row("Hypervisor PID", in.HypervisorPID)
			}
			networkRows(row, netInfo) // port.go
			t := in.Timings
			row("Timings", fmt.Sprintf("create %s, launch %s, first command %s (create → first command %s)",
				t.Create.Round(time.Millisecond), t.Launch.Round(time.Millisecond),
				t.FirstCommand.Round(time.Millisecond), t.CreateToFirstCommand.Round(time.Millisecond)))
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func paren(s string) string {
	if s == "" {
		return ""
	}
	return "(" + s + ")"
}
