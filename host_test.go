package smolvm_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// dbFiles counts this process's open files of the state database in home.
func dbFiles(t *testing.T, home string) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	db, _ := filepath.EvalSymlinks(home)
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && filepath.Dir(target) == db && filepath.Base(target) == "smolvm.db" {
			n++
		}
	}
	return n
}

// TestHostSharesOneStore: the VMs a Host makes and opens use its store (one
// database connection for all), closing them leaves the Host working, and
// a state folder given to another host's calls is refused before anything
// is made.
func TestHostSharesOneStore(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 3*time.Minute)
	h, err := smolvm.OpenHost(home)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.Home() != filepath.Clean(home) {
		t.Errorf("Home() = %s, want %s", h.Home(), home)
	}
	if _, err := h.List(ctx); err != nil {
		t.Fatal(err)
	}
	base := dbFiles(t, home)
	if base == 0 {
		t.Fatalf("no open file of %s/smolvm.db after OpenHost", home)
	}
	cfg := smolvm.Config{MemoryMiB: 256, BootTimeout: testutil.BootTimeout}
	a, err := h.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := h.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	again, err := h.Open(ctx, a.Name())
	if err != nil {
		t.Fatal(err)
	}
	if n := dbFiles(t, home); n != base {
		t.Errorf("%d open files of the state database with three VM handles, %d with none: each handle opened its own store", n, base)
	}
	// The count sees a second store (so the check above can fail).
	if h2, err := smolvm.OpenHost(home); err != nil {
		t.Fatal(err)
	} else if _, err := h2.List(ctx); err != nil || dbFiles(t, home) == base {
		t.Errorf("a second Host's store is not counted (%v)", err)
		h2.Close()
	} else {
		h2.Close()
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := again.Run(ctx, "true"); err == nil {
		t.Error("Run on a closed handle succeeded")
	}
	// a lives in this process: closing the second handle on it stopped
	// nothing, and closing the handle left the host's store open.
	if res, err := a.Run(ctx, "echo ok"); err != nil || string(res.Stdout) != "ok\n" {
		t.Fatalf("Run after another handle's Close: %v, %v", res, err)
	}
	if vms, err := h.List(ctx); err != nil || len(vms) != 2 {
		t.Fatalf("List = %d VMs, %v; want 2", len(vms), err)
	}

	other := t.TempDir()
	if _, err := h.New(ctx, smolvm.Config{Home: other}); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("New with another state folder: %v, want ErrInvalid", err)
	}
	if _, err := h.Cleanup(ctx, smolvm.CleanupOptions{Home: other}); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("Cleanup with another state folder: %v, want ErrInvalid", err)
	}
	if ents, _ := os.ReadDir(other); len(ents) != 0 {
		t.Errorf("a refused call left %d files in the other state folder", len(ents))
	}
}
