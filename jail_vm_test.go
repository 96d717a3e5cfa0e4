package smolvm_test

// Real-VM tests of least privilege on the host: QEMU's user, its cgroup
// and its limits, what its mount namespace shows, what is left after
// delete and after a crash; and the host's capacity limits.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/testutil"
)

// jailHost skips the test where QEMU cannot be jailed (not root), and
// fails it where it should be but is not.
func jailHost(t *testing.T) jail.Host {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("QEMU is jailed only when smolvm runs as root")
	}
	h := jail.Detect()
	if !h.Usable() {
		t.Fatalf("root, but QEMU cannot be jailed: %v", h.UserErr)
	}
	return h
}

// procStatus returns the fields of a /proc/PID/status line.
func procStatus(t *testing.T, pid int, key string) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			return strings.Fields(v)
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, key)
	return nil
}

// cgroupDirs are the folders of the cgroup of the VM id, as the test
// process (whose cgroup is the supervisor's) finds them.
func cgroupDirs(h jail.Host, id string) map[string]string {
	name := "smolvm-" + id
	if h.Cgroups.V2 != "" {
		d := filepath.Join(h.Cgroups.V2, name)
		return map[string]string{"memory": d, "cpu": d, "pids": d}
	}
	dirs := map[string]string{}
	for ctl, parent := range h.Cgroups.V1 {
		dirs[ctl] = filepath.Join(parent, name)
	}
	return dirs
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestJailedHypervisor(t *testing.T) {
	t.Parallel()
	h := jailHost(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, VCPUs: 2, MemoryMiB: 256})
	other := newVM(t, smolvm.Config{Home: home})
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid := in.HypervisorPID
	if !testutil.PidAlive(pid) {
		t.Fatalf("no live hypervisor: %+v", in)
	}

	otherIn, err := other.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var uid uint32
	t.Run("User", func(t *testing.T) {
		// A uid and gid of its own, from the range reserved for user
		// smolvm; smolvm's group alone as a supplementary group.
		if h.IDsErr != nil {
			t.Fatalf("no ids reserved for %s: %v", jail.User, h.IDsErr)
		}
		u := procStatus(t, pid, "Uid")
		n, _ := strconv.ParseUint(u[0], 10, 32)
		uid = uint32(n)
		if !slices.Equal(u, []string{u[0], u[0], u[0], u[0]}) || uid < h.IDs.Start || uid >= h.IDs.Start+h.IDs.Count {
			t.Errorf("QEMU's uids %v, want all one id of %s's range %+v", u, jail.User, h.IDs)
		}
		if g := procStatus(t, pid, "Gid"); !slices.Equal(g, []string{u[0], u[0], u[0], u[0]}) {
			t.Errorf("QEMU's gids %v, want all %s (its uid)", g, u[0])
		}
		if g := procStatus(t, pid, "Groups"); !slices.Equal(g, []string{strconv.Itoa(int(h.GID))}) {
			t.Errorf("QEMU has supplementary groups %v, want %s's alone (%d)", g, jail.User, h.GID)
		}
		if ou := procStatus(t, otherIn.HypervisorPID, "Uid"); ou[0] == u[0] {
			t.Errorf("two VMs' QEMUs run as one uid %s", u[0])
		}
		if eff := procStatus(t, pid, "CapEff"); len(eff) != 1 || eff[0] != "0000000000000000" {
			t.Errorf("QEMU has capabilities %v", eff)
		}
		// A pid namespace of its own: it is pid 1 there.
		if ns := procStatus(t, pid, "NSpid"); len(ns) != 2 || ns[1] != "1" {
			t.Errorf("QEMU's NSpid %v, want its own pid namespace", ns)
		}
		// -sandbox on: seccomp filter mode.
		if s := procStatus(t, pid, "Seccomp"); len(s) != 1 || s[0] != "2" {
			t.Errorf("QEMU's Seccomp %v, want 2 (filter)", s)
		}
	})

	t.Run("Cgroup", func(t *testing.T) {
		if h.Cgroups.Version() == "" {
			t.Skip("no cgroup hierarchy: " + h.Cgroups.Why)
		}
		assertCgroup(t, h, vm.ID(), pid, 256, 2)
	})

	t.Run("MountNamespace", func(t *testing.T) {
		root := fmt.Sprintf("/proc/%d/root", pid)
		var seen []string
		err := filepath.WalkDir(root+"/", func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
			if rel == "/usr" || rel == "/dev" {
				seen = append(seen, rel)
				return fs.SkipDir
			}
			seen = append(seen, rel)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		cache, _ := filepath.EvalSymlinks(filepath.Join(home, "cache"))
		allowed := func(p string) bool {
			switch p {
			case "/", "/usr", "/dev", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/etc/ld.so.cache":
				return true
			}
			for _, keep := range []string{vm.Dir(), filepath.Join(home, "cache", "kernel"), filepath.Join(home, "cache", "initramfs")} {
				if p == keep || strings.HasPrefix(p, keep+"/") || strings.HasPrefix(keep, p+"/") {
					return true
				}
			}
			return false
		}
		var files []string
		for _, p := range seen {
			if !allowed(p) {
				t.Errorf("QEMU's root shows %s", p)
			}
			if fi, err := os.Lstat(root + p); err == nil && fi.Mode().IsRegular() && !strings.HasPrefix(p, vm.Dir()+"/") {
				files = append(files, p)
			}
		}
		t.Logf("QEMU's root: %d entries; files outside its folder: %v (cache %s)", len(seen), files, cache)
		for _, hidden := range []string{other.Dir(), filepath.Join(home, "smolvm.db"), "/etc/passwd", "/proc", "/root", "/home"} {
			if _, err := os.Lstat(root + hidden); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("QEMU sees %s (%v)", hidden, err)
			}
		}
		for _, dev := range []string{"/dev/null", "/dev/urandom"} {
			if fi, err := os.Stat(root + dev); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
				t.Errorf("QEMU lacks %s: %v", dev, err)
			}
		}
	})

	t.Run("OwnFiles", func(t *testing.T) {
		// The other VM's QEMU uid (its gid and smolvm's group) cannot
		// open this VM's files, even where the path to them is open
		// (the home and vms/ are made traversable for the test); this
		// VM's own uid can.
		testOwnFiles(t, home, vm.Dir(), procStatus(t, otherIn.HypervisorPID, "Uid")[0], procStatus(t, pid, "Uid")[0], h.GID)
	})

	if _, err := vm.Run(ctx, "true"); err != nil {
		t.Fatalf("Run in the jailed VM: %v", err)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if testutil.PidAlive(pid) {
		t.Errorf("QEMU %d alive after Delete", pid)
	}
	assertNoCgroup(t, h, vm.ID(), "after Delete")
	if uid != 0 && h.IDs.Held(uid) {
		t.Errorf("uid %d still held after Delete", uid)
	}
}

// testOwnFiles opens the console log in dir as uid other and as uid own
// (each with its gid and group smolvm) with setpriv.
func testOwnFiles(t *testing.T, home, dir, other, own string, group uint32) {
	for _, d := range []string{home, filepath.Join(home, "vms")} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, fi.Mode().Perm()|0o011); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Chmod(d, fi.Mode().Perm()) })
	}
	open := func(uid string) (string, error) {
		out, err := exec.Command("setpriv", "--reuid", uid, "--regid", uid, "--groups", strconv.Itoa(int(group)),
			"head", "-c", "16", filepath.Join(dir, "console.log")).CombinedOutput()
		return string(out), err
	}
	if out, err := open(own); err != nil {
		t.Fatalf("its own uid %s cannot read its console log: %v: %s", own, err, out)
	}
	if out, err := open(other); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("the other QEMU's uid %s read this VM's console log: %v: %q", other, err, out)
	}
}

// assertCgroup checks that QEMU (pid) of VM id runs alone in the VM's
// cgroup in every hierarchy, with the limits of memMiB and vcpus.
func assertCgroup(t *testing.T, h jail.Host, id string, pid, memMiB, vcpus int) {
	t.Helper()
	dirs := cgroupDirs(h, id)
	self := readTrim(t, fmt.Sprintf("/proc/%d/cgroup", pid))
	for ctl, d := range dirs {
		if procs := readTrim(t, filepath.Join(d, "cgroup.procs")); procs != strconv.Itoa(pid) {
			t.Errorf("%s cgroup %s holds %q, want QEMU alone (%d)", ctl, d, procs, pid)
		}
	}
	for _, l := range strings.Split(self, "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) == 3 && slices.ContainsFunc(strings.Split(parts[1], ","), func(c string) bool { return dirs[c] != "" }) &&
			!strings.HasSuffix(parts[2], "/smolvm-"+id) {
			t.Errorf("/proc/%d/cgroup does not name the VM's cgroup in hierarchy %s: %s", pid, parts[1], l)
		}
	}
	if !strings.Contains(self, "/smolvm-"+id) {
		t.Errorf("/proc/%d/cgroup does not name the VM's cgroup:\n%s", pid, self)
	}
	mem := strconv.Itoa((memMiB + qemu.MemoryOverheadMiB) << 20)
	quota := strconv.Itoa(vcpus * jail.CPUPeriod)
	want := map[string]string{
		"memory.limit_in_bytes": mem, "cpu.cfs_quota_us": quota, "cpu.cfs_period_us": "100000", "pids.max": "128",
	}
	if h.Cgroups.V2 != "" {
		want = map[string]string{"memory.max": mem, "cpu.max": quota + " 100000", "pids.max": "128"}
	}
	for file, w := range want {
		ctl, _, _ := strings.Cut(file, ".")
		if got := readTrim(t, filepath.Join(dirs[ctl], file)); got != w {
			t.Errorf("%s = %s, want %s", file, got, w)
		}
	}
}

// assertNoCgroup checks that the cgroup of VM id is gone.
func assertNoCgroup(t *testing.T, h jail.Host, id, when string) {
	t.Helper()
	for _, d := range cgroupDirs(h, id) {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left %s (%v)", d, when, err)
		}
	}
}

// cgroupMounts lists the cgroup (v1 and v2) mounts of process pid's mount
// namespace, as /proc/PID/mountinfo has them.
func cgroupMounts(t *testing.T, pid string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(readTrim(t, "/proc/"+pid+"/mountinfo"), "\n") {
		if strings.Contains(l, " - cgroup") {
			out = append(out, l)
		}
	}
	return out
}

// A supervisor started through `ip netns exec` (a mount namespace whose
// fresh /sys shows no cgroup hierarchy) still gives its QEMU the VM's
// cgroup with its limits, removes it on delete, and `cleanup` run there
// removes the cgroup of a VM whose supervisor was killed; nothing is
// mounted in the host's mount namespace.
func TestJailedHypervisorNetNS(t *testing.T) {
	h := jailHost(t)
	if h.Cgroups.Version() == "" {
		t.Skip("no cgroup hierarchy: " + h.Cgroups.Why)
	}
	n := newTapNS(t)
	ctx := testutil.Context(t, 10*time.Minute)
	before := cgroupMounts(t, "self")
	vm := n.create(t, "--cpus", "2")
	killed := n.create(t)
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ms := cgroupMounts(t, strconv.Itoa(in.SupervisorPID)); len(ms) != 0 {
		t.Fatalf("the supervisor's mount namespace shows cgroup hierarchies, not the case this test is about: %q", ms)
	}
	assertCgroup(t, h, vm.ID(), in.HypervisorPID, 256, 2)

	ik, err := killed.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	assertCgroup(t, h, killed.ID(), ik.HypervisorPID, 256, 1)
	if err := syscall.Kill(ik.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(time.Minute, func() bool { return !testutil.PidAlive(ik.HypervisorPID) }); err != nil {
		t.Fatalf("QEMU outlived its supervisor: %v", err)
	}
	if out, err := n.cli(t, "cleanup"); err != nil {
		t.Fatalf("smolvm cleanup in the namespace: %v\n%s", err, out)
	}
	assertNoCgroup(t, h, killed.ID(), "after cleanup in the namespace")

	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if testutil.PidAlive(in.HypervisorPID) {
		t.Errorf("QEMU %d alive after Delete", in.HypervisorPID)
	}
	assertNoCgroup(t, h, vm.ID(), "after delete")
	if after := cgroupMounts(t, "self"); !slices.Equal(after, before) {
		t.Errorf("the host's cgroup mounts changed:\nbefore %q\nafter  %q", before, after)
	}
	n.assertNothingLeft(t, "after delete")
}

// A killed supervisor takes its QEMU with it; the cgroup stays until
// cleanup removes it with the VM.
func TestJailedHypervisorCleanup(t *testing.T) {
	t.Parallel()
	h := jailHost(t)
	if h.Cgroups.Version() == "" {
		t.Skip("no cgroup hierarchy: " + h.Cgroups.Why)
	}
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	vm := newVM(t, smolvm.Config{Home: home, Persistent: true})
	in, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dirs := cgroupDirs(h, vm.ID())
	for _, d := range dirs {
		if _, err := os.Stat(d); err != nil {
			t.Fatalf("the VM's cgroup: %v", err)
		}
	}
	n, _ := strconv.ParseUint(procStatus(t, in.HypervisorPID, "Uid")[0], 10, 32)
	uid := uint32(n)
	if err := syscall.Kill(in.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Poll(time.Minute, func() bool { return !testutil.PidAlive(in.HypervisorPID) }); err != nil {
		t.Fatalf("QEMU outlived its supervisor: %v", err)
	}
	// QEMU dies of the parent-death signal while its supervisor is still
	// exiting; cleanup removes the VM once the supervisor is gone (a zombie).
	if err := testutil.Poll(time.Minute, func() bool { return !testutil.PidAlive(in.SupervisorPID) }); err != nil {
		t.Fatalf("the killed supervisor did not end: %v", err)
	}
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home}); err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after cleanup (%v)", d, err)
		}
	}
	if !h.IDs.Held(uid) {
		t.Logf("uid %d free after cleanup", uid)
	} else {
		t.Errorf("QEMU's uid %d still held after kill -9 and cleanup", uid)
	}
	if _, err := os.Stat(uidRecord(uid)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cleanup left the record of QEMU's uid %d (%v)", uid, err)
	}
	assertNothingLeft(t, home)
}

// uidRecord is the allocation record of a QEMU's uid.
func uidRecord(uid uint32) string {
	return filepath.Join(jail.UIDDir, strconv.FormatUint(uint64(uid), 10))
}

// hypervisorUID is the uid the VM's QEMU runs as; its record names the
// VM's folder.
func hypervisorUID(t *testing.T, vm *smolvm.VM) uint32 {
	t.Helper()
	in, err := vm.Info(testutil.Context(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseUint(procStatus(t, in.HypervisorPID, "Uid")[0], 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(uidRecord(uint32(n))); err != nil {
		t.Fatalf("no record of QEMU's uid %d: %v", n, err)
	}
	return uint32(n)
}

// Deleting a VM frees its QEMU's uid at once (the record goes with the
// VM), for a VM of this process and a persistent one, not only when a
// later start finds the folder gone.
func TestJailedUIDReleased(t *testing.T) {
	t.Parallel()
	jailHost(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	for _, persistent := range []bool{false, true} {
		vm := newVM(t, smolvm.Config{Home: home, Persistent: persistent})
		uid := hypervisorUID(t, vm)
		if err := vm.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(uidRecord(uid)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("persistent %v: the record of QEMU's uid %d is left after delete (%v)", persistent, uid, err)
		}
	}
	assertNothingLeft(t, home)
}
