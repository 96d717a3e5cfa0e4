package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/smolvm/smolvm"
)

// execFlags are the flags shared by run and exec.
type execFlags struct {
	env         []string
	workdir     string
	user        string
	timeout     time.Duration
	interactive bool
	tty         bool
}

func (f *execFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable (KEY=VALUE), repeatable")
	fs.StringVarP(&f.workdir, "workdir", "w", "", "working directory in the guest (default: the image's WorkingDir, else the user's home)")
	fs.StringVarP(&f.user, "user", "u", "", "run as this guest user: NAME, UID, NAME:GROUP or UID:GID (default: the image's User, else root)")
	fs.DurationVar(&f.timeout, "timeout", 0, "kill the command (and its children) after this long")
	fs.BoolVarP(&f.interactive, "interactive", "i", false, "forward stdin even when it is a terminal")
	fs.BoolVarP(&f.tty, "tty", "t", false, "run the command on a pseudo-terminal")
}

// commandFor builds the guest command from CLI arguments: several
// arguments are an argv; one argument with spaces or shell syntax runs
// through /bin/sh -c.
func commandFor(ctx context.Context, vm *smolvm.VM, args []string) *smolvm.Cmd {
	if len(args) == 1 && strings.ContainsAny(args[0], " \t\n|&;<>()$`\\\"'*?[]#~=%{}") {
		return vm.ShellCommand(ctx, args[0])
	}
	return vm.Command(ctx, args[0], args[1:]...)
}

// runInVM runs args in vm with the terminal's stdio and returns the exit
// code the CLI should exit with.
func runInVM(ctx context.Context, vm *smolvm.VM, args []string, f *execFlags) (int, error) {
	return runCommand(ctx, commandFor(ctx, vm, args), f)
}

// runCommand runs c with the terminal's stdio and the flags' settings and
// returns the exit code the CLI should exit with.
func runCommand(ctx context.Context, c *smolvm.Cmd, f *execFlags) (int, error) {
	for _, kv := range f.env {
		if !strings.Contains(kv, "=") {
			return 0, fmt.Errorf("%w: --env %q: use KEY=VALUE", smolvm.ErrInvalid, kv)
		}
	}
	c.Env, c.Dir, c.User, c.Timeout = f.env, f.workdir, f.user, f.timeout
	c.Stdout, c.Stderr = os.Stdout, os.Stderr
	stdinTTY := term.IsTerminal(int(os.Stdin.Fd()))
	if f.interactive || !stdinTTY && !isDevNull(os.Stdin) {
		// Not forwarded, the command reads the guest's /dev/null: the
		// same as the host's, and it lets the command take the agent's
		// fast lane.
		c.Stdin = os.Stdin
	}
	if f.tty {
		if !stdinTTY {
			return 0, fmt.Errorf("%w: -t needs a terminal on stdin", smolvm.ErrInvalid)
		}
		c.TTY = true
		if w, h, err := term.GetSize(int(os.Stdout.Fd())); err == nil {
			c.Rows, c.Cols = uint16(h), uint16(w)
		}
		old, err := term.MakeRaw(int(os.Stdin.Fd()))
		if err != nil {
			return 0, fmt.Errorf("set terminal raw mode: %w", err)
		}
		defer func() { _ = term.Restore(int(os.Stdin.Fd()), old) }()
		c.Stdin = os.Stdin
	}
	if err := c.Start(); err != nil {
		return exitOf(err, f.timeout)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGWINCH)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGWINCH {
				if w, h, err := term.GetSize(int(os.Stdout.Fd())); err == nil && c.TTY {
					_ = c.Resize(uint16(h), uint16(w))
				}
				continue
			}
			_ = c.Process.Signal(sig.(syscall.Signal))
		case err := <-done:
			return exitOf(err, f.timeout)
		}
	}
}

// exitOf is the exit code of a command's end: its own, 124 when its
// timeout ended it (in the guest, or on the host when the guest did not
// answer in time), 128+N on signal N; or the error of a command that did
// not run.
func exitOf(err error, timeout time.Duration) (int, error) {
	var ee *smolvm.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		if ee.TimedOut {
			fmt.Fprintf(os.Stderr, "smolvm: command timed out after %s and was killed\n", timeout)
			return 124, nil
		}
		if ee.Signal != 0 {
			return 128 + int(ee.Signal), nil
		}
		return ee.ExitCode, nil
	}
	return 0, err
}

func newExecCmd(g *globals) *cobra.Command {
	var f execFlags
	cmd := &cobra.Command{
		Use:   "exec [flags] VM -- COMMAND [ARG...]",
		Short: "Run a command in a running VM",
		Long: `Run a command in a running VM and exit with its exit code.

Several arguments are run as an argv; a single argument with spaces or shell
syntax runs through /bin/sh -c. Stdin is forwarded when it is not a terminal
(or with -i). Ctrl-C is forwarded to the command.`,
		Example: `  smolvm exec web -- uname -a
  smolvm exec web -- 'ls /etc | wc -l'
  echo hi | smolvm exec web -- cat`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			command := args[1:]
			if len(command) > 0 && command[0] == "--" {
				command = command[1:]
			}
			if len(command) == 0 {
				return fmt.Errorf("%w: no command given: smolvm exec VM -- COMMAND", smolvm.ErrInvalid)
			}
			code, err := runInVM(cmd.Context(), vm, command, &f)
			if err != nil {
				return err
			}
			if code != 0 {
				return &exitError{code}
			}
			return nil
		},
	}
	f.register(cmd.Flags())
	return cmd
}

// isDevNull reports whether f is the null device.
func isDevNull(f *os.File) bool {
	a, err1 := f.Stat()
	b, err2 := os.Stat(os.DevNull)
	return err1 == nil && err2 == nil && os.SameFile(a, b)
}
