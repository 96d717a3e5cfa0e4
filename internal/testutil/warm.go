package testutil

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
)

var warm struct {
	once sync.Once
	home string
	err  error
}

// WarmHome is one state folder for a test binary's real-VM tests, with a
// warm snapshot, so that each VM restores in a fraction of a boot (the
// sandboxes of the server tests). Each test deletes its own VMs; the
// package's TestMain calls CloseWarm after the tests.
func WarmHome(t testing.TB) string {
	t.Helper()
	NeedQEMU(t)
	Agent(t)
	Binary(t) // persistent VMs run its supervisor
	warm.once.Do(func() {
		home, err := os.MkdirTemp("", "smvw")
		if err == nil {
			err = os.Symlink(CacheDir(), filepath.Join(home, "cache"))
		}
		if err != nil {
			warm.err = err
			return
		}
		warm.home = home
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
			warm.err = fmt.Errorf("set up %s: %w", home, err)
		}
	})
	if warm.err != nil {
		t.Fatal(warm.err)
	}
	return warm.home
}

// CloseWarm removes WarmHome's folder: an error names the VMs the tests
// left in it and the processes cleanup could not end.
func CloseWarm() error {
	if warm.home == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h, err := smolvm.OpenHost(warm.home)
	if err != nil {
		return err
	}
	vms, err := h.List(ctx)
	if cerr := h.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	var left []string
	for _, in := range vms {
		left = append(left, in.Name)
	}
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: warm.home, All: true}); err != nil {
		return err
	}
	if procs := WaitNoProcesses(warm.home, 30*time.Second); len(procs) > 0 {
		return fmt.Errorf("processes left: %s", strings.Join(procs, "; "))
	}
	if err := os.RemoveAll(warm.home); err != nil {
		return err
	}
	removeOwnHostDir()
	if len(left) > 0 {
		return fmt.Errorf("VMs left by the tests: %s", strings.Join(left, ", "))
	}
	return nil
}
