// Package engine is everything behind the smolvm package's API. Host, one
// per state folder, creates VMs (image resolution, spec building, disks,
// the network spec, the warm snapshot's restore), takes and restores
// snapshots, keeps the warm snapshots, builds and removes images, sets
// the host up, starts, removes and cleans up VMs. Around it: the
// persistent VM's supervisor process (its command line, the ready pipe,
// spawning it), the health probes of supervisors and the killing of those
// that do not answer, the reconciliation of the store with the processes
// that live, the KVM probe and its cache, the process-wide pool of
// prelaunched hypervisors, and the kernel command line. It works on the
// store's records and the hypervisor's types; the smolvm package checks
// what users give it, turns it into the engine's types and back, and
// keeps the VM handle's calls to a running VM. Nothing here is API:
// cmd/smolvm must not import it (see the import test in the smolvm
// package).
package engine

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/store"
)

// Home returns the state folder smolvm uses: $SMOLVM_HOME, else
// $XDG_STATE_HOME/smolvm, else ~/.local/state/smolvm.
func Home() string {
	if h := os.Getenv("SMOLVM_HOME"); h != "" {
		return h
	}
	if x := os.Getenv("XDG_STATE_HOME"); x != "" {
		return filepath.Join(x, "smolvm")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "smolvm")
	}
	return filepath.Join(os.TempDir(), "smolvm")
}

// OpenStore opens the store of state folder home ("" = Home()).
func OpenStore(ctx context.Context, home string) (*store.Store, error) {
	if home == "" {
		home = Home()
	}
	st, err := store.Open(ctx, home)
	if err != nil {
		return nil, fmt.Errorf("open state folder %s (set SMOLVM_HOME to a writable folder): %w", home, err)
	}
	return st, nil
}
