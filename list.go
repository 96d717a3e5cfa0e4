package smolvm

import (
	"context"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/store"
)

// List describes every VM in the default state folder (Host.List for
// another folder). A VM whose supervisor died is reported (and recorded)
// as failed with the reason; one whose supervisor lives but does not
// answer within a couple of seconds is reported as StateUnresponsive (not
// recorded).
func List(ctx context.Context) ([]*Info, error) {
	h, err := OpenHost("")
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.List(ctx)
}

func list(ctx context.Context, st *store.Store) ([]*Info, error) {
	recs, err := engine.Reconcile(ctx, st)
	if err != nil {
		return nil, err
	}
	problems := engine.ProbeAll(ctx, recs) // internal/engine
	out := make([]*Info, 0, len(recs))
	for _, r := range recs {
		in := infoOf(r)
		markUnresponsive(in, problems[r.ID])
		out = append(out, in)
	}
	return out, nil
}

// CleanupOptions tune Cleanup.
type CleanupOptions struct {
	// Home is the state folder ("" = Home()); Host.Cleanup takes its own.
	Home string
	// All removes every VM, running ones included.
	All bool
}

// Cleanup removes VMs whose processes died (state, sockets, disks, leases,
// a leftover hypervisor process), state folders no VM owns and snapshots
// whose making was interrupted. With All it
// removes every VM. It returns the ids it removed.
func Cleanup(ctx context.Context, opts CleanupOptions) ([]string, error) {
	h, err := OpenHost(opts.Home)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.Cleanup(ctx, opts)
}

func cleanup(ctx context.Context, h *Host, opts CleanupOptions) ([]string, error) {
	return h.eng.Cleanup(ctx, opts.All, func(ctx context.Context, id string) {
		if vm, err := open(ctx, h, id, nil); err == nil {
			_ = vm.stop(ctx, true)
		}
	})
}
