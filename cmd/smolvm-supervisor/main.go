// Command smolvm-supervisor runs one persistent VM's supervisor: the
// library starts it detached, as `smolvm-supervisor __supervise ID ...`,
// for each persistent VM when it lies beside the smolvm binary (see
// engine.SupervisorProgram), and the VM lives as long as it does.
//
// It is the smolvm CLI's hidden `__supervise` command alone, without the
// CLI, the HTTP and MCP servers, the E2B API and their libraries: their
// package initialisation and data would otherwise be paid again by every
// idle VM's supervisor (3.4–4.1 MiB each, half its memory; docs/benchmarks.md).
// Build it like the guest agent, static and without gRPC's request tracing:
//
//	CGO_ENABLED=0 go build -tags grpcnotrace -o smolvm-supervisor ./cmd/smolvm-supervisor
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/errdefs"
)

func main() {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "smolvm-supervisor:", err)
		if errors.Is(err, errdefs.ErrInvalid) {
			os.Exit(3)
		}
		os.Exit(1)
	}
}

// run is the CLI's `smolvm __supervise` on args (the command's name
// first), logging as the CLI would: warnings, or everything when
// $SMOLVM_DEBUG is set (the library sets it for a caller that logs debug
// messages).
func run(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] != engine.SuperviseCommand {
		return fmt.Errorf("%w: usage: smolvm-supervisor %s ID ...: the library starts this program itself, for each persistent VM", errdefs.ErrInvalid, engine.SuperviseCommand)
	}
	level := slog.LevelWarn
	if os.Getenv("SMOLVM_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)
	return engine.SupervisorMain(ctx, args[1:], log)
}
