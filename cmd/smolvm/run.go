package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newRunCmd(g *globals) *cobra.Command {
	var vf vmFlags
	var ef execFlags
	var keep bool
	cmd := &cobra.Command{
		Use:   "run [flags] -- COMMAND [ARG...]",
		Short: "Create a VM, run one command in it, delete the VM",
		Long: `Create a sandbox, run a command in it with live output, delete the sandbox,
and exit with the command's exit code.`,
		Example: `  smolvm run -- uname -a
  smolvm run -m 1024 -e FOO=bar -- 'echo $FOO; cat /proc/meminfo | head -1'`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := vf.config(g)
			if err != nil {
				return err
			}
			cfg.Persistent = keep
			ctx := cmd.Context()
			vm, err := smolvm.New(ctx, cfg)
			if err != nil {
				return err
			}
			code, runErr := runInVM(ctx, vm, args, &ef)
			if keep {
				fmt.Fprintln(os.Stderr, "smolvm: VM kept:", vm.Name())
				_ = vm.Close()
			} else if err := vm.Delete(context.WithoutCancel(ctx)); err != nil {
				fmt.Fprintln(os.Stderr, "smolvm: delete VM:", err)
			}
			_ = vm.Close()
			if runErr != nil {
				return runErr
			}
			if code != 0 {
				return &exitError{code}
			}
			return nil
		},
	}
	vf.register(cmd.Flags())
	ef.register(cmd.Flags())
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the VM running afterwards (persistent)")
	return cmd
}

func newCreateCmd(g *globals) *cobra.Command {
	var vf vmFlags
	cmd := &cobra.Command{
		Use:   "create [flags]",
		Short: "Create and boot a persistent VM; print its id",
		Long: `Create and boot a VM that keeps running after this command returns, under a
supervisor process of its own. The new VM's id alone is printed on stdout.`,
		Example: `  id=$(smolvm create --name web)
  smolvm exec $id -- uname -a`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := vf.config(g)
			if err != nil {
				return err
			}
			cfg.Persistent = true
			vm, err := smolvm.New(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			fmt.Println(vm.ID())
			return vm.Close()
		},
	}
	vf.register(cmd.Flags())
	return cmd
}
