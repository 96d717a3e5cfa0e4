package testutil

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
)

var shared struct {
	once sync.Once
	mu   sync.Mutex
	vm   *smolvm.VM
	home string
	err  error
}

// SharedVM returns the VM shared by every test of this test binary that
// does not need a fresh one. It is booted on first use and deleted by Main
// after all tests. Tests that use it must leave it working: no stop, no
// kill of its agent, no changes others could see outside their own files.
func SharedVM(t testing.TB) *smolvm.VM {
	t.Helper()
	NeedQEMU(t)
	shared.once.Do(func() {
		home := newHome(t)
		shared.mu.Lock()
		shared.home = home
		shared.mu.Unlock()
		ensureImage(t, home)
		ctx, cancel := context.WithTimeout(context.Background(), BootTimeout+time.Minute)
		defer cancel()
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, Name: "shared", BootTimeout: BootTimeout})
		shared.mu.Lock()
		defer shared.mu.Unlock()
		if err != nil {
			shared.err = fmt.Errorf("boot the shared VM: %w", err)
			return
		}
		shared.vm = vm
	})
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	if shared.vm == nil {
		t.Fatal("the shared VM could not be booted (see the first test that asked for it)")
	}
	return shared.vm
}

// SharedHome is the state folder of the shared VM ("" before SharedVM).
// Tests may read it but must not create VMs in it: some tests check that
// it holds the shared VM alone.
func SharedHome() string {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	return shared.home
}

// closeShared deletes the shared VM and its home, and checks nothing of it
// is left running.
func closeShared() error {
	shared.mu.Lock()
	vm, home := shared.vm, shared.home
	shared.vm = nil
	shared.mu.Unlock()
	if home == "" {
		return nil
	}
	var errs []error
	if vm != nil {
		errs = append(errs, vm.Close())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home, All: true}); err != nil {
		errs = append(errs, err)
	}
	if left := WaitNoProcesses(home, 30*time.Second); len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes of the shared VM left: %s", strings.Join(left, "; ")))
	}
	errs = append(errs, os.RemoveAll(home))
	return errors.Join(errs...)
}

func killPid(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }
