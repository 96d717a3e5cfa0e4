package smolvm_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/testutil"
)

// TestSpareCapacity: a prelaunched hypervisor (a spare) counts against
// the host's capacity, and gives way to VMs: a spare taken off the count
// by another process's create ends; at the limit no spare is started; a
// create that fits only without the spare succeeds and the spare ends.
// Nothing of a spare is left, its uid included.
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
		// A claimed spare's QEMU, a VM's now, still names its first folder.
		vms, err := testutil.OpenHost(t, home).List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, f := range cmdlines {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
			if slices.ContainsFunc(vms, func(in *smolvm.Info) bool { return in.HypervisorPID == pid }) {
				continue
			}
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
	// freed checks that a jailed QEMU's uid, read from its folder before
	// it went, is free again: its record is gone, or names another
	// folder than dirs (a VM made since has the id).
	freed := func(what, uid string, dirs ...string) {
		t.Helper()
		if uid == "" {
			return // not jailed (not root)
		}
		b, err := os.ReadFile(filepath.Join(jail.UIDDir, uid))
		if err == nil && slices.Contains(dirs, string(b)) || err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: the record of its QEMU's uid %s is left: %q, %v", what, uid, b, err)
		}
	}
	uidOf := func(dir string) string { b, _ := os.ReadFile(filepath.Join(dir, jail.IDFile)); return string(b) }
	pcfg := smolvm.Config{Home: home, Prelaunch: true, MaxVMs: 3}

	newVM(t, pcfg)
	// Another process's create that needs the room removes the record;
	// the spare's owner (this process) ends it.
	dir := prelaunched()
	uid := uidOf(dir)
	if err := os.Remove(filepath.Join(dir, hostcap.SpareFile)); err != nil {
		t.Fatal(err)
	}
	noSpare("after the spare's room was reclaimed")
	freed("a reclaimed spare", uid, dir)

	// A VM claims the spare, at the limit: no spare is started beside it.
	// Its uid is freed when it is deleted (the spare's, moved with its
	// folder).
	newVM(t, pcfg)
	dir = prelaunched()
	claimed := newVM(t, pcfg)
	in, err := claimed.Info(ctx)
	if err != nil || !in.Prelaunched {
		t.Fatalf("a VM after a spare was made: %+v, %v; want it prelaunched", in, err)
	}
	if err := smolvm.WaitPrelaunched(ctx); err != nil {
		t.Fatal(err)
	}
	noSpare("at the limit of VMs")
	uid = uidOf(in.Dir)
	if err := claimed.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	freed("a deleted VM that claimed a spare", uid, dir, in.Dir)

	// 3 VMs and a spare, room for 4: a fourth VM fits only without the
	// spare. It is made, and the spare ends.
	newVM(t, smolvm.Config{Home: home, Prelaunch: true, MaxVMs: 4})
	dir = prelaunched()
	uid = uidOf(dir)
	for _, c := range smolvm.CheckHost(ctx, home) {
		if c.Name == "capacity" && (!strings.Contains(c.Detail, "now 3 VMs and 1536 MiB in 1 state folders") || !strings.Contains(c.Detail, ", and 1 prelaunched hypervisors of 512 MiB")) {
			t.Errorf("doctor's capacity with 3 VMs and a spare: %q", c.Detail)
		}
	}
	fourth := newVM(t, smolvm.Config{Home: home, Cold: true, MaxVMs: 4})
	if got := sh(t, fourth, "echo ok"); got != "ok" {
		t.Errorf("the fourth VM: %q", got)
	}
	noSpare("after a VM took the spare's room")
	freed("a spare that gave way", uid, dir)

	// Another process's spare gives way too: 5 VMs here and the helper's
	// VM and spare, room for 7; one VM more ends the helper's spare.
	helper := exec.Command(os.Args[0], "-test.run=^TestSpareHelper$")
	helper.Env = append(os.Environ(), "SMOLVM_SPARE_HELPER="+home)
	in2, err := helper.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	helper.Stderr = os.Stderr
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = helper.Process.Kill(); _ = helper.Wait() })
	newVM(t, smolvm.Config{Home: home, Cold: true})
	rd := bufio.NewReader(out)
	if line, err := rd.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	dirs := spareDirs()
	if len(dirs) != 1 {
		t.Fatalf("the helper's spares: %v, want one", dirs)
	}
	newVM(t, smolvm.Config{Home: home, Cold: true, MaxVMs: 7})
	noSpare("after a VM took the room of another process's spare")
	_ = in2.Close() // the helper deletes its VM and exits
	if err := helper.Wait(); err != nil {
		t.Errorf("helper: %v", err)
	}
}

// TestSpareHelper is TestSpareCapacity's other process: it makes a VM
// with Prelaunch, room for 7 VMs, in $SMOLVM_SPARE_HELPER, says "ready"
// once its spare is up, and deletes the VM when its stdin closes.
func TestSpareHelper(t *testing.T) {
	home := os.Getenv("SMOLVM_SPARE_HELPER")
	if home == "" {
		t.Skip("run by TestSpareCapacity")
	}
	ctx := testutil.Context(t, 5*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Prelaunch: true, MaxVMs: 7})
	defer func() { _ = smolvm.DiscardPrelaunched(context.Background()) }()
	if err := smolvm.WaitPrelaunched(ctx); err != nil || smolvm.LiveSpares() != 1 {
		t.Fatalf("the helper's spare: %d, %v", smolvm.LiveSpares(), err)
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	if err := vm.Delete(ctx); err != nil {
		t.Error(err)
	}
}
