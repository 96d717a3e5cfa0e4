package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/mcpserver"
	"github.com/smolvm/smolvm/internal/server"
)

func newMCPCmd(g *globals) *cobra.Command {
	var (
		httpAddr, keyFile, outputLimit string
		prelaunch                      bool
		timeout, maxTimeout, idle      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "mcp [--http ADDR]",
		Short: "Serve sandboxes to an AI agent over the Model Context Protocol (stdio, or HTTP)",
		Long: `Serve smolvm's MCP tools (create_sandbox, run_command, write_file, read_file,
list_files, list_sandboxes, delete_sandbox, expose_port, snapshot_sandbox) to an
agent. Over stdio by default, for an MCP host that starts it:

  claude mcp add smolvm -- smolvm mcp

Only the protocol goes to stdout; logs go to stderr. Sandboxes made in a session
are deleted when it ends unless made with keep: true.

With --http ADDR it serves streamable HTTP at http://ADDR/mcp instead (one
session per client; an idle one ends after --session-timeout). The key, from
--api-key-file or $SMOLVM_API_KEY, is then required as 'Authorization: Bearer
KEY'; without one only a loopback address is allowed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			limit, err := smolvm.ParseSizeBytes(outputLimit)
			if err != nil {
				return err
			}
			if limit < 1 || limit > 16<<20 {
				return fmt.Errorf("%w: --output-limit %s: give 1 byte to 16M", smolvm.ErrInvalid, outputLimit)
			}
			opts := mcpserver.Options{OutputLimit: int(limit), DefaultTimeout: timeout, MaxTimeout: maxTimeout,
				SessionTimeout: idle, Prelaunch: prelaunch, SupervisorBinary: os.Getenv("SMOLVM_BIN"), Logger: g.log}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
			defer stop()
			if httpAddr != "" {
				if opts.APIKey, err = apiKey(keyFile); err != nil {
					return err
				}
				return serveMCPHTTP(ctx, httpAddr, opts)
			}
			return serveMCPStdio(ctx, opts)
		},
	}
	f := cmd.Flags()
	f.StringVar(&httpAddr, "http", "", "serve streamable HTTP at http://ADDR/mcp instead of stdio (e.g. 127.0.0.1:7421)")
	f.StringVar(&keyFile, "api-key-file", "", "file holding the bearer key HTTP clients must send (else $SMOLVM_API_KEY)")
	f.StringVar(&outputLimit, "output-limit", "64K", "what run_command keeps of each of stdout and stderr")
	f.DurationVar(&timeout, "timeout", mcpserver.DefaultTimeout, "run_command's timeout when a call gives none")
	f.DurationVar(&maxTimeout, "max-timeout", mcpserver.DefaultMaxTimeout, "the longest timeout a call may ask for")
	f.DurationVar(&idle, "session-timeout", mcpserver.DefaultSessionTimeout, "end an HTTP session idle this long (its sandboxes are deleted)")
	f.BoolVar(&prelaunch, "prelaunch", false, "keep a QEMU started ahead of time for the next one-off run_command (faster, for an idle process)")
	return cmd
}

// serveMCPStdio serves one session on stdin and stdout. Before anything
// else it moves stdout out of everyone's way: the protocol gets a
// duplicate of it, and fd 1 becomes stderr, so nothing this process or a
// child writes to "stdout" can corrupt the protocol.
func serveMCPStdio(ctx context.Context, opts mcpserver.Options) error {
	out, err := reserveStdout()
	if err != nil {
		return err
	}
	if term.IsTerminal(int(os.Stdin.Fd())) {
		fmt.Fprintln(os.Stderr, "smolvm mcp speaks the Model Context Protocol on stdin/stdout: let an agent start it, e.g. 'claude mcp add smolvm -- smolvm mcp' (Ctrl-C to quit)")
	}
	s := mcpserver.New(opts)
	err = s.RunStdio(ctx, os.Stdin, out)
	return errors.Join(err, s.Close())
}

// reserveStdout returns the process's stdout as a new file for the
// protocol alone and points fd 1 (os.Stdout) at stderr.
func reserveStdout() (*os.File, error) {
	fd, err := unix.FcntlInt(1, unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, fmt.Errorf("duplicate stdout: %w", err)
	}
	if err := unix.Dup3(2, 1, 0); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("point stdout at stderr: %w", err)
	}
	return os.NewFile(uintptr(fd), "mcp-stdout"), nil
}

func serveMCPHTTP(ctx context.Context, addr string, opts mcpserver.Options) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: --http %q: give HOST:PORT, e.g. 127.0.0.1:7421", smolvm.ErrInvalid, addr)
	}
	if opts.APIKey == "" && !server.LoopbackHost(host) {
		return fmt.Errorf("%w: --http %s without a key would let anyone who reaches it run code here: set $SMOLVM_API_KEY or --api-key-file, or listen on 127.0.0.1", smolvm.ErrInvalid, addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	s := mcpserver.New(opts)
	mux := http.NewServeMux()
	mux.Handle("/mcp", s.Handler())
	var h http.Handler = mux
	if opts.APIKey == "" {
		h = server.LocalOnly(mux) // no key: no rebound names, no web pages
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	note := ""
	if opts.APIKey == "" {
		note = " (no API key: loopback only)"
	}
	fmt.Fprintf(os.Stderr, "smolvm mcp: serving MCP at http://%s/mcp%s\n", ln.Addr(), note)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err = <-errc:
	case <-ctx.Done():
		// Open event streams would hold Shutdown: give requests a moment,
		// then close what is left.
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close()
		}
		cancel()
		err = nil
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return errors.Join(err, s.Close())
}
