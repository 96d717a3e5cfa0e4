package smolvm

import (
	"context"
	"io"

	"github.com/smolvm/smolvm/internal/engine"
)

// LogOptions tune VM.Logs.
type LogOptions struct {
	// Supervisor prints the log of the VM's supervisor instead of the
	// guest's console.
	Supervisor bool
	// Follow keeps printing while the VM is creating or running, until
	// ctx ends.
	Follow bool
}

// Logs writes the VM's guest console (the newest output the host kept,
// bounded by Config.ConsoleLogMaxBytes) or its supervisor's log to w.
func (vm *VM) Logs(ctx context.Context, w io.Writer, opts LogOptions) error {
	var running func() bool
	if opts.Follow {
		running = func() bool {
			in, err := vm.Info(ctx)
			return err == nil && (in.State == StateRunning || in.State == StateCreating)
		}
	}
	return engine.Logs(ctx, w, vm.dir, vm.name, opts.Supervisor, running)
}
