package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newRunCmd(g *globals) *cobra.Command {
	var vf vmFlags
	var ef execFlags
	var keep bool
	var entrypoint string
	cmd := &cobra.Command{
		Use:   "run [flags] [-- COMMAND [ARG...]]",
		Short: "Create a VM, run one command in it, delete the VM",
		Long: `Create a sandbox, run a command in it with live output, delete the sandbox,
and exit with the command's exit code.

With --image, the image's config applies as in 'docker run': without a
command, its Entrypoint + Cmd run; a command replaces Cmd and runs after
the Entrypoint (--entrypoint replaces it, and the image's Cmd with it).
Every command starts with the image's Env, in its WorkingDir, as its User.`,
		Example: `  smolvm run -- uname -a
  smolvm run -m 1024 -e FOO=bar -- 'echo $FOO; cat /proc/meminfo | head -1'
  smolvm run --image web                  # the image's Entrypoint + Cmd
  smolvm run --image web --entrypoint sh -- -c 'id; pwd'`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := vf.config(g)
			if err != nil {
				return err
			}
			var ep []string
			if cmd.Flags().Changed("entrypoint") {
				if ep = strings.Fields(entrypoint); len(ep) == 0 {
					ep = []string{} // --entrypoint "": the image's is dropped
				}
			}
			argv, direct, err := imageCommand(cmd.Context(), g.h, cfg.Image, ep, args)
			if err != nil {
				return err
			}
			cfg.Persistent = keep
			ctx := cmd.Context()
			vm, err := g.h.New(ctx, cfg)
			if err != nil {
				return err
			}
			c := commandFor(ctx, vm, argv)
			if direct {
				c = vm.Command(ctx, argv[0], argv[1:]...)
			}
			code, runErr := runCommand(ctx, c, &ef)
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
	cmd.Flags().StringVar(&entrypoint, "entrypoint", "", "replace the image's Entrypoint (and its Cmd) with this program (split at spaces)")
	return cmd
}

// imageCommand returns what 'run' runs for args on image (docker's rule):
// with an Entrypoint (the image's or ep), the entrypoint and args (or the
// image's Cmd) as an argv, run as is (direct); otherwise args, or the
// image's Cmd, as the CLI runs any command.
func imageCommand(ctx context.Context, h *smolvm.Host, image string, ep, args []string) (argv []string, direct bool, err error) {
	var ic *smolvm.ImageConfig
	if image != "" {
		im, err := h.InspectImage(ctx, image)
		if err != nil {
			return nil, false, err
		}
		ic = im.Config
	}
	hasEP := len(ep) > 0 || ep == nil && ic != nil && len(ic.Entrypoint) > 0
	argv = ic.Command(ep, args)
	if len(argv) == 0 {
		if image == "" {
			return nil, false, fmt.Errorf("%w: give a command: smolvm run -- COMMAND", smolvm.ErrInvalid)
		}
		return nil, false, fmt.Errorf("%w: image %s has no Entrypoint or Cmd: give a command (smolvm run --image %s -- COMMAND)", smolvm.ErrInvalid, image, image)
	}
	if !hasEP && len(args) == 0 {
		direct = true // the image's Cmd is an argv
	}
	return argv, hasEP || direct, nil
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
			vm, err := g.h.New(cmd.Context(), cfg)
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
