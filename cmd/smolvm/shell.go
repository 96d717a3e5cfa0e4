package main

import (
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"
)

func newShellCmd(g *globals) *cobra.Command {
	var (
		f     execFlags
		shell string
	)
	cmd := &cobra.Command{
		Use:   "shell [flags] VM",
		Short: "Open an interactive login shell in a running VM",
		Long: `Open an interactive login shell (/bin/sh -l) in a running VM, on a
pseudo-terminal that follows the size of yours. The shell's exit code is
smolvm's. When stdin is not a terminal the shell reads commands from it
without a pseudo-terminal.`,
		Example: `  smolvm shell web
  echo 'uname -a' | smolvm shell web`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			f.tty = term.IsTerminal(int(os.Stdin.Fd()))
			f.interactive = true
			code, err := runInVM(cmd.Context(), vm, []string{shell, "-l"}, &f)
			if err != nil {
				return err
			}
			if code != 0 {
				return &exitError{code}
			}
			return nil
		},
	}
	cmd.Flags().StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable (KEY=VALUE), repeatable")
	cmd.Flags().StringVarP(&f.workdir, "workdir", "w", "", "working directory in the guest (default: the image's WorkingDir, else the user's home)")
	cmd.Flags().StringVarP(&f.user, "user", "u", "", "log in as this guest user: NAME, UID, NAME:GROUP or UID:GID (default: the image's User, else root)")
	cmd.Flags().StringVar(&shell, "shell", "/bin/sh", "the shell to run")
	return cmd
}
