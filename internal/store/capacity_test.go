package store

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
)

// Creates from several handles at once never pass the limits: the check
// and the insert are one transaction.
func TestCapacity(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	stores := []*Store{openTest(t, home), openTest(t, home), openTest(t, home)}
	c := Capacity{MaxVMs: 4}
	var ok, full atomic.Int32
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Go(func() {
			err := stores[i%len(stores)].CreateVMWithin(ctx, &VM{MemoryMiB: 100}, c)
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, ErrCapacity):
				full.Add(1)
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if ok.Load() != 4 || full.Load() != 8 {
		t.Fatalf("%d created and %d refused, want 4 and 8", ok.Load(), full.Load())
	}
	s := stores[0]
	err := s.CreateVMWithin(ctx, &VM{MemoryMiB: 100}, c)
	var ce *CapacityError
	if !errors.As(err, &ce) || ce.Used != 4 || ce.Max != 4 || err.Error() != "host at capacity: 4 of 4 VMs running" {
		t.Fatalf("fifth VM: %v", err)
	}
	// Stopped and failed VMs hold nothing.
	vms, _ := s.ListVMs(ctx)
	if _, err := s.UpdateVM(ctx, vms[0].ID, func(v *VM) error { v.State = StateStopped; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVMWithin(ctx, &VM{MemoryMiB: 100}, c); err != nil {
		t.Fatalf("after a stop: %v", err)
	}
	// Starting the stopped VM again would make 5.
	start := func(v *VM) error { v.State = StateCreating; return nil }
	if _, err := s.UpdateVMWithin(ctx, vms[0].ID, c, start); !errors.As(err, &ce) || ce.Used != 4 {
		t.Fatalf("start of a stopped VM at capacity: %v", err)
	}
	if _, err := s.UpdateVMWithin(ctx, vms[1].ID, c, func(v *VM) error { v.State = StateRunning; return nil }); err != nil {
		t.Fatalf("a VM that holds resources already changes state at capacity: %v", err)
	}
	// Memory: 4 × 100 MiB hold resources now.
	err = s.CreateVMWithin(ctx, &VM{MemoryMiB: 200}, Capacity{MaxMemoryMiB: 500})
	if !errors.As(err, &ce) || ce.Used != 400 || ce.Asked != 200 || !errors.Is(err, ErrCapacity) {
		t.Fatalf("memory over the limit: %v", err)
	}
	if err := s.CreateVMWithin(ctx, &VM{MemoryMiB: 100}, Capacity{MaxMemoryMiB: 500}); err != nil {
		t.Fatalf("memory at the limit: %v", err)
	}
	if err := s.CreateVM(ctx, &VM{MemoryMiB: 100}); err != nil {
		t.Fatalf("no limits: %v", err)
	}
}
