package engine

import (
	"context"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/store"
)

// Host is the engine of one state folder: its store (one per Host, shared
// by every VM handle of it) and its files. The smolvm package's Host
// wraps one.
type Host struct {
	// Home is the state folder.
	Home string
	// Store is its SQLite state.
	Store *store.Store
	// Version is smolvm's, recorded in the images the host builds.
	Version string
}

// OpenHost opens the store of the state folder home ("" is Home()).
func OpenHost(ctx context.Context, home, version string) (*Host, error) {
	if home == "" {
		home = Home()
	}
	home = filepath.Clean(home)
	st, err := OpenStore(ctx, home)
	if err != nil {
		return nil, err
	}
	return &Host{Home: home, Store: st, Version: version}, nil
}

// Close releases the store.
func (h *Host) Close() error { return h.Store.Close() }

// cacheDir is where downloads, builds and the default image live.
func (h *Host) cacheDir() string { return filepath.Join(h.Home, "cache") }
