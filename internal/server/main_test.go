package server

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
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestMain removes the shared warm home after the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if err := closeWarm(); err != nil {
		fmt.Fprintln(os.Stderr, "server tests:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

var warm struct {
	once sync.Once
	home string
	err  error
}

// warmHome is one state folder for the package's real-VM tests, with a
// warm snapshot (sandboxes restore from it in a fraction of a cold boot).
// Each test deletes its own sandboxes; TestMain removes the folder.
func warmHome(t testing.TB) string {
	t.Helper()
	testutil.NeedQEMU(t)
	testutil.Agent(t)
	testutil.Binary(t) // persistent VMs run its supervisor
	warm.once.Do(func() {
		home, err := os.MkdirTemp("", "smvs")
		if err == nil {
			err = os.Symlink(testutil.CacheDir(), filepath.Join(home, "cache"))
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

func closeWarm() error {
	if warm.home == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vms, err := smolvm.ListIn(ctx, warm.home)
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
	if procs := testutil.WaitNoProcesses(warm.home, 30*time.Second); len(procs) > 0 {
		return fmt.Errorf("processes left: %s", strings.Join(procs, "; "))
	}
	if err := os.RemoveAll(warm.home); err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("VMs left by the tests: %s", strings.Join(left, ", "))
	}
	return nil
}
