package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm/bench"
)

func newBenchCmd(g *globals) *cobra.Command {
	var (
		opts    bench.Options
		modes   string
		asJSON  bool
		verbose bool
		tuned   string
		idle    bench.IdleOptions
		soak    bench.SoakOptions
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure create, launch, first command, warm command and stop + delete",
		// The bench opens the state folder itself, through the library;
		// --idle with --idle-bin drives another build's CLI, whose state
		// folder this build's store must not upgrade.
		Annotations: map[string]string{noHost: "the bench opens its own"},
		Long: `Create VMs one after another in each mode and report, per phase, the minimum,
median, 95th percentile and maximum: create, launch (hypervisor up), first
command (guest agent answers), warm command ('true'), stop + delete, and the
whole wait from create to first command.

Modes: cold (stock kernel, cold boot), restore (the warm snapshot 'smolvm setup'
makes), prelaunch (the same restore into a QEMU started ahead of time, as a
program creating VM after VM gets with the library's Config.Prelaunch), tuned
(cold boot of the kernel 'smolvm kernel build' makes). Then one VM
answers --warm-runs pings and 'true' commands, and the same command over SSH
(the host's dropbear copied into the guest, reached through a port forwarded
over the VM's NIC; with --warm-net none, bridged over the agent's exec
stream). With --concurrency N, VMs are also
created N at a time: throughput and host memory per idle VM.

With --idle N[,N…], it measures idle persistent VMs instead ('smolvm create',
as agents keep them between steps): it holds N of them, lets them settle,
measures each one's host CPU (QEMU and supervisor, from schedstat, over
--idle-window) and memory (PSS, which counts the snapshot memory the VMs
share once), then times 'smolvm exec VM -- true' into ten of them while the
rest idle; then grows to the next N.

With --soak N it runs the soak instead: N cycles of create (a restore of the
warm snapshot) → exec ('true', and an 'echo' whose output is checked) →
delete, one after another, then checks that they left nothing behind
(processes, this process's open files, sockets, files in the state folder,
state rows, TAP devices, nftables rules, cgroups). It reports the cycles,
the failures, the leaks per kind and the time per cycle of the first and
last 50 cycles, and exits non-zero on any failure or leak. --soak-mode
persistent (default) makes each VM under a supervisor process, as 'smolvm
create' does; library keeps them in this process.

Every VM is named bench-PID-… (soak-PID-…) and deleted at the end, also on
Ctrl-C.`,
		Example: `  smolvm bench --vms 10
  smolvm bench --vms 4 --modes restore --concurrency 2 --json
  smolvm bench --idle 100,250,500 --idle-window 30s
  smolvm bench --soak 1000`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			done := make(chan struct{})
			defer close(done)
			go func() {
				select {
				case <-ctx.Done():
					select {
					case <-done:
						// The command returned (done is closed before
						// the deferred stop cancels ctx): no interrupt.
						return
					default:
					}
					// A second Ctrl-C ends the process at once.
					stop()
					fmt.Fprintln(os.Stderr, "\nbench: interrupted: deleting its VMs…")
				case <-done:
				}
			}()
			if modes != "" {
				opts.Modes = strings.Split(modes, ",")
				for i := range opts.Modes {
					opts.Modes[i] = strings.TrimSpace(opts.Modes[i])
				}
			}
			if tuned != "" {
				opts.TunedKernel = func(string) (string, error) { return tuned, nil }
			}
			opts.Home = g.homeDir()
			opts.Logger = g.log
			opts.Command = "smolvm " + strings.Join(os.Args[1:], " ")
			if term.IsTerminal(int(os.Stderr.Fd())) {
				opts.Progress = os.Stderr
			}
			if verbose {
				opts.Verbose = os.Stderr
			}
			if len(idle.Counts) > 0 {
				return runIdleBench(ctx, opts.Home, idle, asJSON)
			}
			var rep interface {
				WriteJSON(io.Writer) error
				WriteTable(io.Writer) error
			}
			var err error
			if soak.Cycles > 0 {
				soak.Home, soak.Logger, soak.Command, soak.Progress = opts.Home, opts.Logger, opts.Command, opts.Progress
				var sr *bench.SoakReport
				if sr, err = bench.Soak(ctx, soak); sr != nil {
					rep = sr
				}
			} else {
				var br *bench.Report
				if br, err = bench.Run(ctx, opts); br != nil {
					rep = br
				}
			}
			if rep != nil {
				var out io.Writer = os.Stdout
				var werr error
				if asJSON {
					werr = rep.WriteJSON(out)
				} else {
					werr = rep.WriteTable(out)
				}
				if err == nil {
					err = werr
				}
			}
			if err != nil && ctx.Err() != nil && cmd.Context().Err() == nil {
				return fmt.Errorf("bench interrupted: %w", context.Cause(ctx))
			}
			return err
		},
	}
	f := cmd.Flags()
	f.IntVar(&opts.VMs, "vms", 10, "VMs per mode (and in all with --concurrency)")
	f.StringVar(&modes, "modes", strings.Join(bench.Modes(), ","), "modes to measure: "+strings.Join(bench.Modes(), ", "))
	f.IntVar(&opts.WarmRuns, "warm-runs", 50, "pings and 'true' commands on one VM (0 skips)")
	f.IntVar(&opts.Concurrency, "concurrency", 0, "also create VMs this many at a time (0 skips)")
	f.BoolVar(&opts.NoSSH, "no-ssh", false, "skip the SSH comparison")
	f.StringVar(&opts.WarmNetwork, "warm-net", "", "network of the warm round trip's VM: user (default; SSH through a forwarded port) or none (SSH bridged over the agent's exec stream)")
	f.StringVar(&tuned, "tuned-kernel", "", "kernel for the tuned mode (default: the one 'smolvm kernel build' made)")
	f.IntSliceVar(&idle.Counts, "idle", nil, "instead: hold this many idle persistent VMs (ascending list, e.g. 100,250,500) and measure each one's host CPU and memory and an exec into one of them")
	f.DurationVar(&idle.Window, "idle-window", 30*time.Second, "with --idle: how long each VM's CPU is measured")
	f.DurationVar(&idle.Settle, "idle-settle", 15*time.Second, "with --idle: how long the VMs idle before the window")
	f.IntVar(&idle.Parallel, "idle-parallel", 2, "with --idle: VMs created at a time")
	f.StringVar(&idle.Binary, "idle-bin", "", "with --idle: the smolvm binary that creates and runs the VMs (default: this one)")
	f.IntVar(&soak.Cycles, "soak", 0, "run N create → exec → delete cycles and check for leaks, instead of the phases")
	f.StringVar(&soak.Mode, "soak-mode", bench.SoakPersistent, "VMs of the soak: "+strings.Join(bench.SoakModes(), " or "))
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.BoolVarP(&verbose, "verbose", "v", false, "print each VM's phases as it finishes")
	return cmd
}

// runIdleBench runs `bench --idle` and prints its report.
func runIdleBench(ctx context.Context, home string, opts bench.IdleOptions, asJSON bool) error {
	opts.Home = home
	opts.Command = "smolvm " + strings.Join(os.Args[1:], " ")
	if term.IsTerminal(int(os.Stderr.Fd())) {
		opts.Progress = os.Stderr
	}
	rep, err := bench.RunIdle(ctx, opts)
	if rep != nil {
		var werr error
		if asJSON {
			werr = rep.WriteJSON(os.Stdout)
		} else {
			werr = rep.WriteTable(os.Stdout)
		}
		err = errors.Join(err, werr)
	}
	return err
}
