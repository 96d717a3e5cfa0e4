package smolvm

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/supervisor"
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
	name := supervisor.ConsoleLog
	if opts.Supervisor {
		name = supervisor.LogFile
	}
	path := filepath.Join(vm.dir, name)
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("read logs of VM %s: %w", vm.name, err)
	}
	if !opts.Follow {
		return consolelog.Copy(w, path)
	}
	return consolelog.Follow(ctx, w, path, 200*time.Millisecond, func() bool {
		in, err := vm.Info(ctx)
		return err == nil && (in.State == StateRunning || in.State == StateCreating)
	})
}
