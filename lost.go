package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/lane"
	"github.com/smolvm/smolvm/internal/store"
)

// settleTimeout bounds the wait, after a call lost its connection, for the
// VM's supervisor to record why: a guest that panicked or powered off
// ends its QEMU a moment after the channel closes, and the supervisor
// records the reason once QEMU is gone.
const settleTimeout = 10 * time.Second

// connectionLost says whether err is a call's connection ending under it:
// the guest channel closed, or the supervisor's socket did.
func connectionLost(err error) bool {
	return errors.Is(err, lane.ErrClosed) || errors.Is(err, ErrUnavailable)
}

// settled waits, for a call that lost its connection, until the record of
// the VM leaves running, as long as its supervisor runs to record it
// (alive, not stopped) and at most settleTimeout; it returns the last
// record read.
func (vm *VM) settled(ctx context.Context, rec *store.VM) *store.VM {
	deadline := time.Now().Add(settleTimeout)
	for rec.State == store.StateRunning && time.Now().Before(deadline) {
		pid := rec.SupervisorPID
		if pid == os.Getpid() || !engine.ProcessAlive(pid) || engine.Stopped(pid) {
			return rec
		}
		select {
		case <-ctx.Done():
			return rec
		case <-time.After(100 * time.Millisecond):
		}
		r, err := vm.st.GetVM(context.WithoutCancel(ctx), vm.id)
		if err != nil {
			return rec
		}
		rec = r
	}
	return rec
}

// supervisorGone explains a call that lost its connection because the
// VM's supervisor ended without recording why (it was killed, and QEMU
// with it); nil while the supervisor lives.
func supervisorGone(rec *store.VM) error {
	if !rec.Live() || rec.SupervisorPID == os.Getpid() || engine.ProcessAlive(rec.SupervisorPID) {
		return nil
	}
	return fmt.Errorf("the supervisor of VM %s (pid %d) ended during the call, and the VM with it (%w): remove it with 'smolvm rm -f %s' (or 'smolvm cleanup' for every such VM)", rec.Name, rec.SupervisorPID, ErrUnavailable, rec.Name)
}
