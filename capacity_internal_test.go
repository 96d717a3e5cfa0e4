package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/store"
)

// capacityHomes are n state folders of one host (a host folder of the
// test's own), each with its store.
func capacityHomes(t *testing.T, n int) ([]string, []*store.Store) {
	t.Setenv(HostDirEnv, t.TempDir())
	t.Setenv(MaxVMsEnv, "")
	t.Setenv(MaxMemoryMiBEnv, "")
	var homes []string
	var stores []*store.Store
	for range n {
		home := t.TempDir()
		st, err := store.Open(context.Background(), home)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		homes, stores = append(homes, home), append(stores, st)
	}
	return homes, stores
}

// live is a VM row whose supervisor (this process) lives.
func live(mem int) *store.VM {
	return &store.VM{State: store.StateCreating, SupervisorPID: os.Getpid(), MemoryMiB: mem}
}

// Creates in three state folders at once share the host's limit: exactly
// the limit get in, whichever folders they are in, and a refusal names
// the limit, where it was set and the fix.
func TestHostCapacityShared(t *testing.T) {
	ctx := context.Background()
	_, stores := capacityHomes(t, 3)
	cfg := &Config{MaxVMs: 4}
	var ok, full atomic.Int32
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Go(func() {
			err := createWithin(ctx, stores[i%3], cfg, live(100))
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
		t.Fatalf("%d created and %d refused over 3 state folders, want 4 and 8 (one limit for the host)", ok.Load(), full.Load())
	}
	// A folder that has none of the 4 still sees the host full.
	var empty *store.Store
	for _, st := range stores {
		if vms, _ := st.ListVMs(ctx); len(vms) == 0 {
			empty = st
		}
	}
	if empty == nil {
		empty = stores[0]
	}
	err := createWithin(ctx, empty, cfg, live(100))
	for _, want := range []string{"host at capacity: 4 of 4 VMs running", "in other state folders", "from Config.MaxVMs", "smolvm rm", "--max-vms", "smolvm setup --max-vms"} {
		if !errors.Is(err, ErrCapacity) || !strings.Contains(err.Error(), want) {
			t.Errorf("fifth VM: %v; want ErrCapacity with %q", err, want)
		}
	}
	// Guest memory counts over the folders too: 4 × 100 MiB held.
	err = createWithin(ctx, stores[0], &Config{MaxMemoryMiB: 450}, live(100))
	if !errors.Is(err, ErrCapacity) || !strings.Contains(err.Error(), "400 of 450 MiB of guest memory in use") || !strings.Contains(err.Error(), "--max-memory") {
		t.Errorf("100 MiB more with 450 MiB for the host: %v", err)
	}
	if err := createWithin(ctx, stores[0], &Config{MaxMemoryMiB: 500}, live(100)); err != nil {
		t.Errorf("100 MiB more with 500 MiB for the host: %v", err)
	}
	// Starting a stopped VM again counts the other folders too.
	stopped := &store.VM{State: store.StateStopped, MemoryMiB: 100}
	if err := createWithin(ctx, empty, cfg, stopped); err != nil {
		t.Fatal(err)
	}
	start := func(v *store.VM) error { v.State, v.SupervisorPID = store.StateCreating, os.Getpid(); return nil }
	if err := startWithin(ctx, empty, &Config{MaxVMs: 5}, stopped.ID, start); !errors.Is(err, ErrCapacity) || !strings.Contains(err.Error(), "5 of 5 VMs running") {
		t.Errorf("start of a stopped VM with 5 VMs on the host and a limit of 5: %v", err)
	}
	if err := startWithin(ctx, empty, &Config{MaxVMs: 6}, stopped.ID, start); err != nil {
		t.Errorf("start with a limit of 6: %v", err)
	}
}

// VMs whose supervisor is gone hold nothing, in any folder; a folder that
// holds nothing, or is gone, leaves the registry.
func TestHostCapacityReclaims(t *testing.T) {
	ctx := context.Background()
	homes, stores := capacityHomes(t, 2)
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := &store.VM{State: store.StateRunning, SupervisorPID: cmd.Process.Pid, MemoryMiB: 100}
	if err := createWithin(ctx, stores[0], &Config{}, dead); err != nil {
		t.Fatal(err)
	}
	if err := createWithin(ctx, stores[0], &Config{}, &store.VM{State: store.StateRunning, SupervisorPID: cmd.Process.Pid, MemoryMiB: 100}); err != nil {
		t.Fatal(err)
	}
	entries := func() int {
		ents, err := os.ReadDir(filepath.Join(hostcap.Dir(), "homes"))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	if n := entries(); n != 1 {
		t.Fatalf("%d registered state folders, want 1", n)
	}
	// The second folder: its one VM is in, the first folder's dead VMs
	// do not count, and that folder leaves the registry.
	if err := createWithin(ctx, stores[1], &Config{MaxVMs: 1}, live(100)); err != nil {
		t.Fatalf("a host whose only VMs' supervisors are gone: %v", err)
	}
	if n := entries(); n != 1 {
		t.Errorf("%d registered state folders after the count, want 1 (the first holds nothing)", n)
	}
	// A registered folder that is removed leaves the registry.
	stores[1].Close()
	if err := os.RemoveAll(homes[1]); err != nil {
		t.Fatal(err)
	}
	if err := createWithin(ctx, stores[0], &Config{MaxVMs: 1}, live(100)); err != nil {
		t.Fatalf("after the other folder was removed: %v", err)
	}
	if n := entries(); n != 1 {
		t.Errorf("%d registered state folders, want 1", n)
	}
}

// Where a limit comes from: Config, else the environment, else the
// host's setting (smolvm setup), else the default; -1 is none.
func TestHostCapacitySettings(t *testing.T) {
	capacityHomes(t, 0)
	resolve := func(cfg Config) limits {
		t.Helper()
		l, err := cfg.capacity()
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	defVMs, _ := DefaultCapacity()
	if l := resolve(Config{}); l.MaxVMs != defVMs || !strings.Contains(l.vmsFrom, "default") {
		t.Errorf("nothing set: %d from %q", l.MaxVMs, l.vmsFrom)
	}
	if err := SetHostCapacity(HostCapacity{MaxVMs: 7, MaxMemoryMiB: -1}); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadHostCapacity(); err != nil || got != (HostCapacity{MaxVMs: 7, MaxMemoryMiB: -1}) {
		t.Errorf("ReadHostCapacity: %+v, %v", got, err)
	}
	if l := resolve(Config{}); l.MaxVMs != 7 || l.MaxMemoryMiB != 0 || !strings.Contains(l.vmsFrom, "capacity.json") {
		t.Errorf("host setting 7 VMs, no memory limit: %d, %d from %q", l.MaxVMs, l.MaxMemoryMiB, l.vmsFrom)
	}
	t.Setenv(MaxVMsEnv, "5")
	if l := resolve(Config{}); l.MaxVMs != 5 || l.vmsFrom != "$"+MaxVMsEnv {
		t.Errorf("env 5 over the host's 7: %d from %q", l.MaxVMs, l.vmsFrom)
	}
	if l := resolve(Config{MaxVMs: 3}); l.MaxVMs != 3 {
		t.Errorf("Config 3 over env 5: %d", l.MaxVMs)
	}
	if err := SetHostCapacity(HostCapacity{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(HostDir(), hostcap.LimitsFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("settings back to the defaults leave %v", err)
	}
	if err := SetHostCapacity(HostCapacity{MaxVMs: -2}); !errors.Is(err, ErrInvalid) {
		t.Errorf("a limit of -2: %v", err)
	}
	if err := os.WriteFile(filepath.Join(HostDir(), hostcap.LimitsFile), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := (&Config{}).capacity(); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "smolvm setup --max-vms") {
		t.Errorf("a broken settings file: %v", err)
	}
}

// A host folder that another user could change is refused.
func TestHostDirChecked(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	t.Setenv(HostDirEnv, dir)
	_, stores := capacityHomes(t, 1)
	t.Setenv(HostDirEnv, dir)
	err := createWithin(context.Background(), stores[0], &Config{}, live(100))
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), HostDirEnv) {
		t.Errorf("a world-writable host folder: %v", err)
	}
	if vms, _ := stores[0].ListVMs(context.Background()); len(vms) != 0 {
		t.Errorf("a refused create left %d rows", len(vms))
	}
}

// BenchmarkCreateWithin is the cost of the host-wide check per create,
// with the given number of other state folders holding a VM each; the
// baseline is the store's own transaction alone.
func BenchmarkCreateWithin(b *testing.B) {
	for _, others := range []int{-1, 0, 1, 10} {
		name := fmt.Sprintf("others=%d", others)
		if others < 0 {
			name = "store-only"
		}
		b.Run(name, func(b *testing.B) {
			b.Setenv(HostDirEnv, b.TempDir())
			ctx := context.Background()
			open := func() *store.Store {
				st, err := store.Open(ctx, b.TempDir())
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { st.Close() })
				return st
			}
			for range max(others, 0) {
				if err := createWithin(ctx, open(), &Config{}, live(100)); err != nil {
					b.Fatal(err)
				}
			}
			st := open()
			cfg := &Config{MaxVMs: 1 << 20}
			b.ResetTimer()
			for b.Loop() {
				rec := live(100)
				var err error
				if others < 0 {
					err = st.CreateVMWithin(ctx, rec, store.Capacity{MaxVMs: 1 << 20})
				} else {
					err = createWithin(ctx, st, cfg, rec)
				}
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := st.DeleteVM(ctx, rec.ID); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// createWithin records rec in st within cfg's capacity, as a create does.
func createWithin(ctx context.Context, st *store.Store, cfg *Config, rec *store.VM) error {
	return cfg.within(filepath.Dir(st.Path()))(ctx, func(c store.Capacity) error { return st.CreateVMWithin(ctx, rec, c) })
}

// startWithin records stopped VM id as starting within cfg's capacity,
// as Start does.
func startWithin(ctx context.Context, st *store.Store, cfg *Config, id string, fn func(*store.VM) error) error {
	return cfg.within(filepath.Dir(st.Path()))(ctx, func(c store.Capacity) error {
		_, err := st.UpdateVMWithin(ctx, id, c, fn)
		return err
	})
}
