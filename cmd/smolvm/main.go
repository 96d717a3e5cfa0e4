// Command smolvm creates and runs disposable microVM sandboxes.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

// noHost annotates the commands that open no state folder before they run
// (version, doctor, kernel, the supervisor's own); the others find it in
// globals.h.
const noHost = "nohost"

// opensNoHost tells the commands that need no state folder: those marked
// noHost (or below one), help and completion.
func opensNoHost(cmd *cobra.Command) bool {
	for c := cmd; c != nil; c = c.Parent() {
		if c.Annotations[noHost] != "" || c.Name() == "help" || c.Name() == "completion" {
			return true
		}
	}
	return false
}

// exitError carries a process exit code through cobra.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

type globals struct {
	home  string
	debug bool
	log   *slog.Logger
	h     *smolvm.Host // opened on first use (see host)
}

// host is the state folder of this run (--home, else smolvm.Home()),
// opened on first use: every VM the command touches shares its store.
func (g *globals) host() (*smolvm.Host, error) {
	if g.h == nil {
		h, err := smolvm.OpenHost(g.home)
		if err != nil {
			return nil, err
		}
		g.h = h
	}
	return g.h, nil
}

// homeDir is the run's state folder, for a command that opens no Host.
func (g *globals) homeDir() string {
	if g.h != nil {
		return g.h.Home()
	}
	if g.home == "" {
		return smolvm.Home()
	}
	return filepath.Clean(g.home)
}

// open is Host.Open on the run's state folder.
func (g *globals) open(ctx context.Context, ref string) (*smolvm.VM, error) {
	h, err := g.host()
	if err != nil {
		return nil, err
	}
	return h.Open(ctx, ref)
}

func (g *globals) close() {
	if g.h != nil {
		_ = g.h.Close()
	}
}

func main() {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer cancel()
	if os.Getenv("SMOLVM_BIN") == "" {
		// Detached supervisors run this same binary, whatever its name.
		if exe, err := os.Executable(); err == nil {
			if err := os.Setenv("SMOLVM_BIN", exe); err != nil {
				fmt.Fprintln(os.Stderr, "smolvm: warning:", err)
			}
		}
	}
	g := &globals{}
	root := newRoot(g)
	err := root.ExecuteContext(ctx)
	g.close()
	var ee *exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		os.Exit(ee.code)
	default:
		fmt.Fprintln(os.Stderr, "smolvm:", err)
		os.Exit(exitCode(err))
	}
}

// exitCode maps error kinds to exit codes, so scripts can tell them apart.
func exitCode(err error) int {
	// A command that could not start exits as a shell's would: 127 when
	// it does not exist, 126 when it cannot run.
	if se := (*smolvm.StartError)(nil); errors.As(err, &se) && se.ExitCode > 0 {
		return se.ExitCode
	}
	switch {
	case errors.Is(err, smolvm.ErrNotFound):
		return 2
	case errors.Is(err, smolvm.ErrInvalid):
		return 3
	case errors.Is(err, smolvm.ErrNotRunning):
		return 4
	case errors.Is(err, smolvm.ErrExists), errors.Is(err, smolvm.ErrInUse):
		return 5
	case errors.Is(err, smolvm.ErrCapacity):
		return 6
	}
	return 1
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "smolvm",
		Short: "Disposable, hardware-isolated Linux sandboxes for AI agents",
		Long: `smolvm boots microVMs (QEMU, one kernel each) in about a second, runs commands
in them with millisecond round trips, and throws them away.

Start with:  smolvm setup && smolvm run -- uname -a`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			level := slog.LevelWarn
			if g.debug || os.Getenv("SMOLVM_DEBUG") != "" {
				level = slog.LevelDebug
			}
			g.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			slog.SetDefault(g.log)
			if opensNoHost(cmd) {
				return nil
			}
			_, err := g.host()
			return err
		},
	}
	root.Version = versionLine()
	root.SetVersionTemplate("smolvm {{.Version}}\n")
	root.PersistentFlags().StringVar(&g.home, "home", "", "state folder (default $SMOLVM_HOME, else $XDG_STATE_HOME/smolvm)")
	root.PersistentFlags().BoolVar(&g.debug, "debug", false, "log debug messages, naming each phase")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		hint := ""
		if c.Name() == "run" || c.Name() == "exec" {
			hint = "; put the command after '--', e.g. smolvm " + map[string]string{"run": "run", "exec": "exec VM"}[c.Name()] + " -- ls -la"
		}
		return fmt.Errorf("%w: %w (see '%s --help'%s)", smolvm.ErrInvalid, err, c.CommandPath(), hint)
	})
	root.AddCommand(newImageCmd(g))
	root.AddCommand(newPortCmd(g))    // port.go
	root.AddCommand(newBrowserCmd(g)) // browser.go
	root.AddCommand(
		newSetupCmd(g), newDoctorCmd(g), newRunCmd(g), newCreateCmd(g), newStartCmd(g),
		newExecCmd(g), newListCmd(g), newInfoCmd(g), newStopCmd(g), newRmCmd(g),
		newLogsCmd(g), newCleanupCmd(g), newVersionCmd(), newSuperviseCmd(g),
		newSnapshotCmd(g), newPauseCmd(g), newResumeCmd(g), newBenchCmd(g), newCpCmd(g), newEnvCmd(g), newShellCmd(g), newKernelCmd(g), newMCPCmd(g),
		newServeCmd(g), // serve.go
	)
	invalidArgs(root)
	return root
}

// invalidArgs makes a wrong number of arguments an ErrInvalid (exit 3) with
// a pointer to the command's help, like a bad flag.
func invalidArgs(c *cobra.Command) {
	if check := c.Args; check != nil {
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return fmt.Errorf("%w: %w (usage: %s; see '%s --help')", smolvm.ErrInvalid, err, cmd.UseLine(), cmd.CommandPath())
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		invalidArgs(sub)
	}
}
