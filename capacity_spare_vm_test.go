package smolvm_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestSpareCapacity: a prelaunched hypervisor (a spare) counts against
// the host's capacity, and gives way to VMs. With room for 3 VMs: a
// spare taken off the count by another process's create ends; a create
// that fits only without the spare succeeds and the spare ends; at the
// limit no spare is started. Nothing of a spare is left.
func TestSpareCapacity(t *testing.T) {
	// A host folder of its own: only this test's VMs count.
	t.Setenv(smolvm.HostDirEnv, t.TempDir())
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("Setup with the warm snapshot: %v", err)
	}
	t.Cleanup(func() { _ = smolvm.DiscardPrelaunched(context.Background()) })
	spares := filepath.Join(home, "spares")
	// spareDirs are the spares' folders; each counts (has its record).
	spareDirs := func() []string {
		t.Helper()
		ents, _ := os.ReadDir(spares)
		var dirs []string
		for _, e := range ents {
			d := filepath.Join(spares, e.Name())
			if _, err := os.Stat(filepath.Join(d, hostcap.SpareFile)); err != nil {
				t.Errorf("spare %s does not count: %v", e.Name(), err)
			}
			dirs = append(dirs, d)
		}
		return dirs
	}
	noSpare := func(when string) {
		t.Helper()
		if err := testutil.Poll(time.Minute, func() bool {
			ents, _ := os.ReadDir(spares)
			return smolvm.LiveSpares() == 0 && len(ents) == 0
		}); err != nil {
			ents, _ := os.ReadDir(spares)
			t.Fatalf("%s: %d live spares, folders %v; want none", when, smolvm.LiveSpares(), ents)
		}
		cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, f := range cmdlines {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), spares+"/") {
				t.Errorf("%s: a spare's process still runs: %s", when, f)
			}
		}
	}
	prelaunched := func() string {
		t.Helper()
		if err := smolvm.WaitPrelaunched(ctx); err != nil {
			t.Fatal(err)
		}
		dirs := spareDirs()
		if len(dirs) != 1 || smolvm.LiveSpares() != 1 {
			t.Fatalf("spares after a restore with Prelaunch: %v (%d live), want one", dirs, smolvm.LiveSpares())
		}
		return dirs[0]
	}
	pcfg := smolvm.Config{Home: home, Prelaunch: true, MaxVMs: 3}

	newVM(t, pcfg)
	// Another process's create that needs the room removes the record;
	// the spare's owner (this process) ends it.
	if err := os.Remove(filepath.Join(prelaunched(), hostcap.SpareFile)); err != nil {
		t.Fatal(err)
	}
	noSpare("after the spare's room was reclaimed")

	// 2 VMs and a spare: a third VM fits only without the spare. It is
	// made, and the spare ends.
	newVM(t, pcfg)
	prelaunched()
	third := newVM(t, smolvm.Config{Home: home, Cold: true, MaxVMs: 3})
	if got := sh(t, third, "echo ok"); got != "ok" {
		t.Errorf("the third VM: %q", got)
	}
	noSpare("after a VM took the spare's room")

	// At the limit: the VM is made, but no spare is started beside it.
	if err := third.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	newVM(t, pcfg)
	if err := smolvm.WaitPrelaunched(ctx); err != nil {
		t.Fatal(err)
	}
	noSpare("at the limit of VMs")
}
