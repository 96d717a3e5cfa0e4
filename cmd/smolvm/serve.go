package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/e2b"
	"github.com/smolvm/smolvm/internal/mcpserver"
	"github.com/smolvm/smolvm/internal/server"
)

// defaultListen is where `smolvm serve` listens unless told.
const defaultListen = "127.0.0.1:7420"

func newServeCmd(g *globals) *cobra.Command {
	var (
		listen         string
		keyFile        string
		defaultTimeout time.Duration
		maxSandboxes   int
		allowMounts    []string
		allowLoopback  bool
		capacity       capacityFlags // capacity.go
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the HTTP API (native /v1, and E2B's) on one listener",
		Long: `Serve smolvm over HTTP: the native API under /v1 (its OpenAPI document at
GET /v1/openapi.json), and an E2B-compatible API for the e2b SDK (set
E2B_API_KEY to the key, E2B_API_URL and E2B_SANDBOX_URL to http://ADDR). Sandboxes made through it are persistent VMs named by
their id: a restart of the server keeps them, and their timeouts.

The API key comes from --api-key-file (the file's first line) or
$SMOLVM_API_KEY; clients send it as 'Authorization: Bearer KEY'. Without a key
the server listens on loopback only, and refuses any other address.
SIGTERM or Ctrl-C stops it gracefully: no new requests, streams closed
cleanly; the sandboxes keep running.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			key, err := apiKey(keyFile)
			if err != nil {
				return err
			}
			if err := checkListen(listen, key != ""); err != nil {
				return err
			}
			if maxSandboxes < 0 {
				return fmt.Errorf("%w: --max-sandboxes %d: give 0 (no limit of the server's own) or more", smolvm.ErrInvalid, maxSandboxes)
			}
			if defaultTimeout < 0 {
				return fmt.Errorf("%w: --default-timeout %s: give a duration, 0 for never", smolvm.ErrInvalid, defaultTimeout)
			}
			maxVMs, maxMemMiB, err := capacity.limits()
			if err != nil {
				return err
			}
			return serve(cmd.Context(), g, server.Options{Home: smolvm.Home(), Listen: listen, APIKey: key,
				DefaultTimeout: defaultTimeout, MaxSandboxes: maxSandboxes, MaxVMs: maxVMs, MaxMemoryMiB: maxMemMiB,
				AllowMounts: allowMounts, AllowHostLoopback: allowLoopback, Logger: g.log})
		},
	}
	f := cmd.Flags()
	f.StringVar(&listen, "listen", defaultListen, "address to listen on, HOST:PORT (a non-loopback one needs an API key)")
	f.StringVar(&keyFile, "api-key-file", "", "file whose first line is the API key (default: $SMOLVM_API_KEY)")
	f.DurationVar(&defaultTimeout, "default-timeout", 5*time.Minute, "a sandbox's lifetime when its creation gives no timeout (0: never)")
	f.IntVar(&maxSandboxes, "max-sandboxes", 0, "most sandboxes at once (0: only the host's capacity bounds them)")
	capacity.register(f, "new sandboxes (of every API it serves)")
	f.StringArrayVar(&allowMounts, "allow-mount", nil, "a host folder under which sandboxes may mount host folders (repeatable; none: mounts refused)")
	f.BoolVar(&allowLoopback, "allow-host-loopback", false, "let a sandbox's \"hosts\" map a name to 127.0.0.1, opening every service bound to this host's loopback to that sandbox (default: refused)")
	return cmd
}

// apiKey reads the key from the file, else $SMOLVM_API_KEY ("" for none).
func apiKey(file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(os.Getenv("SMOLVM_API_KEY")), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("%w: --api-key-file: %w", smolvm.ErrInvalid, err)
	}
	key, _, _ := strings.Cut(string(b), "\n")
	key = strings.TrimSpace(key)
	if key == "" {
		return "", fmt.Errorf("%w: --api-key-file %s: its first line is empty: write the key there", smolvm.ErrInvalid, file)
	}
	return key, nil
}

// checkListen refuses an address that is not loopback when there is no
// key.
func checkListen(addr string, haveKey bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: --listen %q: give HOST:PORT, e.g. %s: %w", smolvm.ErrInvalid, addr, defaultListen, err)
	}
	if haveKey || server.LoopbackHost(host) {
		return nil
	}
	return fmt.Errorf("%w: --listen %s is not a loopback address and the server has no API key: anyone who reaches it could run commands; give a key with --api-key-file or $SMOLVM_API_KEY, or listen on 127.0.0.1", smolvm.ErrInvalid, addr)
}

func serve(ctx context.Context, g *globals, opts server.Options) error {
	srv, err := server.New(opts)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return errors.Join(fmt.Errorf("listen on %s (is another server there? choose another with --listen): %w", opts.Listen, err),
			srv.Shutdown())
	}
	// The E2B-compatible API shares the listener (internal/e2b).
	e2bAPI := e2b.New(srv.Registry(), opts.APIKey, opts.Logger)
	for _, p := range e2b.Patterns {
		srv.Handle(p, e2bAPI)
	}
	// MCP over streamable HTTP at /mcp (internal/mcpserver), the same key
	// as a bearer token; its sessions' sandboxes go when they end.
	mcpSrv := mcpserver.New(mcpserver.Options{Home: opts.Home, APIKey: opts.APIKey,
		SupervisorBinary: os.Getenv("SMOLVM_BIN"), MaxVMs: opts.MaxVMs, MaxMemoryMiB: opts.MaxMemoryMiB, Logger: opts.Logger})
	srv.Handle("/mcp", mcpSrv.Handler())
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 30 * time.Second}
	hs.RegisterOnShutdown(srv.StopStreams)
	hs.RegisterOnShutdown(e2bAPI.StopStreams)
	if opts.APIKey == "" {
		fmt.Fprintf(os.Stderr, "smolvm: serving on http://%s with no API key: loopback only (give --api-key-file or $SMOLVM_API_KEY to require one)\n", ln.Addr())
	} else {
		fmt.Fprintf(os.Stderr, "smolvm: serving on http://%s (API key required)\n", ln.Addr())
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- hs.Serve(ln) }()
	select {
	case err := <-done:
		return errors.Join(err, mcpSrv.Close(), srv.Shutdown())
	case <-ctx.Done():
	}
	fmt.Fprintln(os.Stderr, "smolvm: shutting down: no new requests; the sandboxes keep running")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Shutdown stops new requests and waits for the running ones; the
	// streams (hijacked connections) end through srv.Shutdown.
	err = hs.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = hs.Close()
	}
	// Serve returns ErrServerClosed once Shutdown or Close began: the
	// expected end; anything else is a failure of its own.
	if serr := <-done; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return errors.Join(err, mcpSrv.Close(), srv.Shutdown())
}
