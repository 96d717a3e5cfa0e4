package smolvm_test

// Real-VM tests of snapshots: a restored clone is the machine at snapshot
// time (files, processes) yet a distinct machine (entropy, clock, hostname,
// machine id); clones are independent; stale and in-use snapshots are
// refused; the warm snapshot made by Setup is what New restores, and a
// broken one does not stop New.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// restore starts a clone of snapshot in home; it is closed when the test
// ends.
func restore(t *testing.T, home, snapshot, name string) *smolvm.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.BootTimeout)
	defer cancel()
	vm, err := smolvm.Restore(ctx, snapshot, smolvm.Config{Home: home, Name: name, BootTimeout: testutil.BootTimeout})
	if err != nil {
		t.Fatalf("Restore %s as %s: %v", snapshot, name, err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

func TestSnapshotRestore(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	src := newVM(t, smolvm.Config{Home: home, Name: "source"})

	pid := sh(t, src, "echo snapshot-time > /root/state.txt; sleep 100000 >/dev/null 2>&1 & echo $!")
	if _, err := src.Snapshot(ctx, "bad/name"); !errors.Is(err, smolvm.ErrInvalid) {
		t.Errorf("Snapshot with a bad name: %v, want ErrInvalid", err)
	}
	info, err := src.Snapshot(ctx, "s1")
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if info.MemoryBytes <= 0 || info.SourceVM != src.ID() {
		t.Errorf("snapshot info %+v", info)
	}
	if _, err := src.Snapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrExists) {
		t.Errorf("second snapshot named s1: %v, want ErrExists", err)
	}
	// The source goes on after its snapshot.
	if got := sh(t, src, "cat /root/state.txt; kill -0 "+pid+" && echo alive"); got != "snapshot-time\nalive" {
		t.Errorf("source after the snapshot: %q", got)
	}
	sh(t, src, "echo after > /root/state.txt")

	// The clock check: a clone restored 5 s after the snapshot
	// must still have the host's time. (The sleep makes the gap the check
	// is about; it waits for no condition.)
	time.Sleep(5 * time.Second)
	clones := make([]*smolvm.VM, 2)
	var wg sync.WaitGroup
	for i := range clones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clones[i] = restore(t, home, "s1", "clone"+strconv.Itoa(i))
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	type identity struct{ random, hostname, machineID string }
	var ids []identity
	for _, c := range clones {
		// Files and processes are as at snapshot time.
		if got := sh(t, c, "cat /root/state.txt; kill -0 "+pid+" && echo alive"); got != "snapshot-time\nalive" {
			t.Errorf("%s: state %q, want the snapshot's file and process", c.Name(), got)
		}
		// busybox date has whole seconds: the guest's second must be
		// within 1 s of the host's time around the call.
		before := float64(time.Now().UnixNano()) / 1e9
		guest, err := strconv.ParseFloat(sh(t, c, "date +%s"), 64)
		after := float64(time.Now().UnixNano()) / 1e9
		if err != nil {
			t.Fatalf("%s: date: %v", c.Name(), err)
		}
		if guest < math.Floor(before)-1 || guest > after+1 {
			t.Errorf("%s: wall clock %.0f, host %.3f..%.3f: more than 1 s off", c.Name(), guest, before, after)
		}
		id := identity{
			random:    sh(t, c, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"),
			hostname:  sh(t, c, "hostname"),
			machineID: sh(t, c, "cat /etc/machine-id"),
		}
		if id.hostname != c.Name() {
			t.Errorf("%s: hostname %q, want the clone's name", c.Name(), id.hostname)
		}
		ids = append(ids, id)
	}
	if ids[0].random == ids[1].random || ids[0].machineID == ids[1].machineID || ids[0].hostname == ids[1].hostname {
		t.Errorf("the clones are not distinct machines: %+v", ids)
	}

	// Clones are independent of each other and of the source.
	sh(t, clones[0], "echo mine > /root/only-clone0")
	for _, vm := range []*smolvm.VM{clones[1], src} {
		if got := sh(t, vm, "cat /root/only-clone0 2>/dev/null || echo absent"); got != "absent" {
			t.Errorf("%s sees clone0's file: %q", vm.Name(), got)
		}
	}
	if got := sh(t, clones[1], "cat /root/state.txt"); got != "snapshot-time" {
		t.Errorf("clone1 sees the source's later write: %q", got)
	}

	// A snapshot in use is not deleted; an unused one is, with its files.
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrInUse) {
		t.Errorf("DeleteSnapshot while clones run: %v, want ErrInUse", err)
	}
	list, err := testutil.OpenHost(t, home).Snapshots(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "s1" {
		t.Fatalf("ListSnapshots: %v, %v", list, err)
	}
	dir := list[0].Dir

	t.Run("Stale", func(t *testing.T) {
		// A snapshot of another kernel/initramfs/agent, or of another
		// machine layout, is refused with what to do.
		for name, edit := range map[string]func(map[string]any){
			"image changed":  func(s map[string]any) { s["image_fingerprint"] = strings.Repeat("0", 64) },
			"layout changed": func(s map[string]any) { s["machine_layout"] = 1 },
		} {
			stale := "stale-" + strings.ReplaceAll(name, " ", "-")
			if _, err := src.Snapshot(ctx, stale); err != nil {
				t.Fatalf("Snapshot: %v", err)
			}
			specPath := filepath.Join(filepath.Dir(dir), stale, "spec.json")
			b, err := os.ReadFile(specPath)
			if err != nil {
				t.Fatal(err)
			}
			var spec map[string]any
			if err := json.Unmarshal(b, &spec); err != nil {
				t.Fatal(err)
			}
			edit(spec)
			b, _ = json.Marshal(spec)
			if err := os.WriteFile(specPath, b, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err = smolvm.Restore(ctx, stale, smolvm.Config{Home: home})
			if err == nil || !strings.Contains(err.Error(), "stale") || !strings.Contains(err.Error(), "smolvm snapshot rm "+stale) {
				t.Errorf("%s: Restore: %v, want a stale-snapshot error naming the fix", name, err)
			}
			if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, stale); err != nil {
				t.Errorf("DeleteSnapshot %s: %v", stale, err)
			}
		}
		if _, err := smolvm.Restore(ctx, "no-such-snapshot", smolvm.Config{Home: home}); !errors.Is(err, smolvm.ErrNotFound) {
			t.Errorf("Restore of an unknown snapshot: %v, want ErrNotFound", err)
		}
		// A clone has its snapshot's shape: asking for another is refused.
		for _, cfg := range []smolvm.Config{{Home: home, MemoryMiB: 1024}, {Home: home, VCPUs: 2}} {
			if _, err := smolvm.Restore(ctx, "s1", cfg); !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), "512 MiB") {
				t.Errorf("Restore of s1 with %d MiB, %d vCPUs: %v; want ErrInvalid naming the snapshot's shape", cfg.MemoryMiB, cfg.VCPUs, err)
			}
		}
	})

	for _, c := range clones {
		if err := c.Close(); err != nil {
			t.Errorf("Close %s: %v", c.Name(), err)
		}
	}
	if err := testutil.OpenHost(t, home).DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatalf("DeleteSnapshot after the clones are gone: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot folder %s still there: %v", dir, err)
	}
}

// TestWarmStart checks the warm snapshot Setup makes: New restores it
// instead of booting, Cold boots, and a warm snapshot that no longer
// restores makes New boot rather than fail.
func TestWarmStart(t *testing.T) {
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("Setup with the warm snapshot: %v", err)
	}
	snaps, err := testutil.OpenHost(t, home).Snapshots(ctx)
	if err != nil || len(snaps) != 1 || !snaps[0].Warm {
		t.Fatalf("after Setup: snapshots %+v, %v; want one warm snapshot", snaps, err)
	}
	// Setup again finds it and makes no other.
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if again, _ := testutil.OpenHost(t, home).Snapshots(ctx); len(again) != 1 || again[0].Created != snaps[0].Created {
		t.Errorf("second Setup changed the warm snapshots: %+v", again)
	}

	from := func(cfg smolvm.Config) string {
		t.Helper()
		cfg.Home = home
		vm := newVM(t, cfg)
		if got := sh(t, vm, "echo ok; hostname"); got != "ok\n"+vm.Name() {
			t.Errorf("%s: %q", vm.Name(), got)
		}
		if !smolvm.OnLane(ctx, vm) {
			t.Errorf("%s: the agent's fast lane is down", vm.Name())
		}
		info, err := vm.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if early := smolvm.LaneDialedEarly(vm); early != (info.Snapshot != "") {
			t.Errorf("%s (snapshot %q): first call over a lane dialed before the guest ran: %v", vm.Name(), info.Snapshot, early)
		}
		if err := vm.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		return info.Snapshot
	}
	if got := from(smolvm.Config{}); got != snaps[0].Name {
		t.Errorf("New restored %q, want the warm snapshot %s", got, snaps[0].Name)
	}
	// The warm snapshot is its VM's memory file (mostly holes: free
	// memory was punched out) and a migration stream of device state.
	var ram syscall.Stat_t
	if err := syscall.Stat(filepath.Join(snaps[0].Dir, "ram"), &ram); err != nil {
		t.Fatalf("warm snapshot without its memory file: %v", err)
	}
	if used := ram.Blocks * 512; used <= 0 || used >= ram.Size/2 {
		t.Errorf("warm memory file takes %d of %d bytes on disk: free memory not punched out", used, ram.Size)
	}
	if fi, err := os.Stat(filepath.Join(snaps[0].Dir, "memory")); err != nil || fi.Size() > 4<<20 {
		t.Errorf("warm migration stream: %v, %v; want device state only", fi, err)
	}
	// A clone of it maps that file copy-on-write: a snapshot of the clone
	// must hold all of its memory, and restore with what it wrote.
	clone := newVM(t, smolvm.Config{Home: home, Name: "warm-clone"})
	sh(t, clone, "echo from-the-clone > /root/mark")
	if _, err := clone.Snapshot(ctx, "of-clone"); err != nil {
		t.Fatalf("snapshot of a warm clone: %v", err)
	}
	again := restore(t, home, "of-clone", "clone-of-clone")
	if got := sh(t, again, "cat /root/mark; hostname"); got != "from-the-clone\nclone-of-clone" {
		t.Errorf("restored snapshot of a warm clone: %q", got)
	}
	// The clone that was snapshotted hung up on its fast lane; it dials
	// again on the next call.
	if got := sh(t, clone, "cat /root/mark"); got != "from-the-clone" || !smolvm.OnLane(ctx, clone) {
		t.Errorf("warm clone after its snapshot: %q, fast lane up %v", got, smolvm.OnLane(ctx, clone))
	}
	if err := again.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := clone.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if got := from(smolvm.Config{Cold: true}); got != "" {
		t.Errorf("New with Cold restored %q, want a boot", got)
	}
	// Another shape has no warm snapshot: it boots.
	if got := from(smolvm.Config{MemoryMiB: 384}); got != "" {
		t.Errorf("New with 384 MiB restored %q, want a boot", got)
	}

	// Prelaunch: after a restore, a QEMU for the next VM of the shape waits
	// in spares/; the next New claims it and is a clone like any other
	// (its own hostname; its NIC connected: it reaches a server on the
	// host). Nothing is left once the spares are discarded, and Cleanup
	// removes the folder of a spare whose process is gone.
	port := hostServer(t)
	pcfg := smolvm.Config{Home: home, Prelaunch: true, Hosts: map[string][]string{"host.test": {"127.0.0.1"}}}
	t.Cleanup(func() { _ = smolvm.DiscardPrelaunched(context.Background()) })
	first := newVM(t, pcfg)
	// The spare starts a moment later (prelaunchDelay) by itself.
	spares := filepath.Join(home, "spares")
	if err := testutil.Poll(time.Minute, func() bool { ents, _ := os.ReadDir(spares); return len(ents) == 1 }); err != nil {
		t.Fatalf("no spare started after a restore with Prelaunch")
	}
	if err := smolvm.WaitPrelaunched(ctx); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(spares); len(ents) != 1 {
		t.Fatalf("spares after a restore with Prelaunch: %v, want one", ents)
	}
	second := newVM(t, pcfg)
	if in, err := second.Info(ctx); err != nil || !in.Prelaunched || in.Snapshot != snaps[0].Name {
		t.Errorf("second VM with Prelaunch: %+v, %v; want restored from %s into the prelaunched hypervisor", in, err, snaps[0].Name)
	}
	if got := sh(t, second, "hostname"); got != second.Name() {
		t.Errorf("hostname of the prelaunched clone: %q, want %q", got, second.Name())
	}
	if !smolvm.LaneDialedEarly(second) {
		t.Errorf("the prelaunched clone's first call did not go over a lane dialed before it ran")
	}
	if got := sh(t, second, fmt.Sprintf("wget -qO- http://host.test:%d/", port)); got != "hello from the host" {
		t.Errorf("the prelaunched clone's network: %q", got)
	}
	// A spare whose QEMU died is not used: the VM restores into its own.
	if err := smolvm.WaitPrelaunched(ctx); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(spares)
	if len(ents) != 1 {
		t.Fatalf("spares: %v, want one", ents)
	}
	spareDir := filepath.Join(spares, ents[0].Name()) + "/" // claimed ones moved away
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	killed := 0
	for _, f := range cmdlines {
		if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), spareDir) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				killed++
			}
		}
	}
	if killed != 1 {
		t.Fatalf("killed %d spare QEMUs, want 1", killed)
	}
	if err := testutil.Poll(time.Minute, func() bool { return smolvm.LiveSpares() == 0 }); err != nil {
		t.Fatalf("the spare's owner did not see its QEMU exit: %v", err)
	}
	third := newVM(t, pcfg)
	if in, err := third.Info(ctx); err != nil || in.Prelaunched || in.Snapshot != snaps[0].Name {
		t.Errorf("VM after its spare died: %+v, %v; want restored from %s into a QEMU of its own", in, err, snaps[0].Name)
	}
	if got := sh(t, third, "hostname"); got != third.Name() {
		t.Errorf("hostname: %q, want %q", got, third.Name())
	}
	for _, vm := range []*smolvm.VM{first, second, third} {
		if err := vm.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	if err := smolvm.DiscardPrelaunched(ctx); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(spares); len(ents) != 0 {
		t.Errorf("spares after DiscardPrelaunched: %v", ents)
	}
	// No QEMU runs any more in this home (the VMs are closed, the spares
	// discarded).
	cmdlines, _ = filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range cmdlines {
		if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), "qemu") && strings.Contains(string(b), home+"/") {
			t.Errorf("a spare's QEMU still runs: %s", f)
		}
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(spares, "stale")
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stale, "owner"), []byte(strconv.Itoa(dead.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home}); err != nil {
		t.Errorf("Cleanup: %v", err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Cleanup left the folder of a spare whose process is gone: %v", err)
	}

	// A warm snapshot that does not restore (here: cut short) is skipped.
	mem := filepath.Join(snaps[0].Dir, "memory")
	if err := os.Truncate(mem, 4096); err != nil {
		t.Fatal(err)
	}
	if got := from(smolvm.Config{}); got != "" {
		t.Errorf("New over a broken warm snapshot restored %q, want a boot", got)
	}
	// Setup remakes it, and VMs restore again.
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("Setup over a broken warm snapshot: %v", err)
	}
	remade, _ := testutil.OpenHost(t, home).Snapshots(ctx)
	var warm []*smolvm.SnapshotInfo
	for _, sn := range remade {
		if sn.Warm {
			warm = append(warm, sn)
		}
	}
	if len(warm) != 1 || warm[0].Name != snaps[0].Name || !warm[0].Created.After(snaps[0].Created) {
		var got []string
		for _, sn := range warm {
			got = append(got, sn.Name+" made "+sn.Created.Format(time.RFC3339Nano))
		}
		t.Errorf("warm snapshots after Setup over a broken one: %v; want %s made after %s", got, snaps[0].Name, snaps[0].Created.Format(time.RFC3339Nano))
	}
	if got := from(smolvm.Config{}); got != snaps[0].Name {
		t.Errorf("New after Setup remade the warm snapshot restored %q, want %s", got, snaps[0].Name)
	}
}

// TestSetupWithoutRoomForWarm: on a file system without room for the warm
// snapshot's memory file, Setup skips the warm snapshot instead of failing
// (its VM would die writing its memory), and VMs boot.
func TestSetupWithoutRoomForWarm(t *testing.T) {
	testutil.NeedQEMU(t)
	home := t.TempDir()
	if err := syscall.Mount("tmpfs", home, "tmpfs", 0, "size=64m"); err != nil {
		t.Skipf("mount a small tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(home, syscall.MNT_DETACH) })
	if err := os.Symlink(testutil.CacheDir(), filepath.Join(home, "cache")); err != nil {
		t.Fatal(err)
	}
	ctx := testutil.Context(t, 5*time.Minute)
	if _, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home}); err != nil {
		t.Fatalf("Setup with 64 MiB free: %v", err)
	}
	if snaps, err := testutil.OpenHost(t, home).Snapshots(ctx); err != nil || len(snaps) != 0 {
		t.Errorf("snapshots after Setup with 64 MiB free: %+v, %v; want none", snaps, err)
	}
	vm := newVM(t, smolvm.Config{Home: home})
	if got := sh(t, vm, "echo booted"); got != "booted" {
		t.Errorf("VM: %q", got)
	}
	if err := vm.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// A tuned kernel that cannot be built (here: the source package is
// missing) leaves the host set up with Debian's kernel, and Setup says so.
func TestSetupTunedKernelFallback(t *testing.T) {
	testutil.NeedQEMU(t)
	home := t.TempDir()
	if err := os.Symlink(testutil.CacheDir(), filepath.Join(home, "cache")); err != nil {
		t.Fatal(err)
	}
	missing := errors.New("cannot build the tuned kernel, the host is missing /usr/src/linux-source-6.1.tar.xz (package linux-source-6.1)")
	smolvm.FailTunedKernelBuild(t, missing)
	ctx := testutil.Context(t, 5*time.Minute)
	d, err := smolvm.Setup(ctx, smolvm.SetupOptions{Home: home, TunedKernel: true, NoWarm: true})
	if !errors.Is(err, missing) || !strings.Contains(err.Error(), "Debian's kernel") {
		t.Errorf("Setup with a tuned kernel that cannot be built: %v; want the build's error and the fallback named", err)
	}
	if d == nil || d.Kernel == "" || d.Initrd == "" {
		t.Fatalf("Setup set up no image after the tuned kernel failed: %+v", d)
	}
	for _, f := range []string{d.Kernel, d.Initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("image file: %v", err)
		}
	}
}
