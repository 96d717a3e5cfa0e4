package main

import (
	"fmt"
	"os"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newLogsCmd(g *globals) *cobra.Command {
	var follow, sup bool
	cmd := &cobra.Command{
		Use:   "logs VM",
		Short: "Print a VM's guest console (or its supervisor log)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			return vm.Logs(cmd.Context(), os.Stdout, smolvm.LogOptions{Supervisor: sup, Follow: follow})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing while the VM runs")
	cmd.Flags().BoolVar(&sup, "supervisor", false, "print the supervisor's log instead")
	return cmd
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:         "version",
		Annotations: map[string]string{noHost: "no state"},
		Short:       "Print the version",
		Args:        cobra.NoArgs,
		Run: func(cmd *cobra.Command, args []string) {
			fmt.Println("smolvm " + versionLine())
		},
	}
}

// versionLine is what `smolvm version` and `smolvm --version` print after
// the program's name.
func versionLine() string {
	return fmt.Sprintf("%s (%s, %s/%s)", smolvm.Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// newSuperviseCmd is the hidden command the library runs for each
// persistent VM's supervisor; its arguments are the library's (see
// smolvm.SupervisorMain).
func newSuperviseCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:                "__supervise ID",
		Annotations:        map[string]string{noHost: "the supervisor opens its own"},
		Short:              "Run a VM's supervisor (internal)",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return smolvm.SupervisorMain(cmd.Context(), args, g.log)
		},
	}
}
