package smolvm_test

// Real-VM tests of host folders (Config.Mounts, virtiofs): read-only
// enforced on the host, writes both ways with the folder owner's ids,
// nothing outside the folder reachable, a large file intact, the
// daemons gone after stop, delete and a killed supervisor, and bad
// input refused before boot.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
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
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/testutil"
)

// needMounts skips where host folders cannot work (they need root).
func needMounts(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("host folders need smolvm to run as root")
	}
}

// mountRun runs script in the guest as root and returns its result.
func mountRun(t *testing.T, ctx context.Context, vm *smolvm.VM, script string) *smolvm.Result {
	t.Helper()
	res, err := vm.Run(ctx, script)
	if err != nil {
		t.Fatalf("run %q: %v", script, err)
	}
	return res
}

// mountOK runs script and fails the test unless it exits 0.
func mountOK(t *testing.T, ctx context.Context, vm *smolvm.VM, script string) string {
	t.Helper()
	res := mountRun(t, ctx, vm, script)
	if res.ExitCode != 0 {
		t.Fatalf("%q: exit %d, stdout %q, stderr %q", script, res.ExitCode, res.Stdout, res.Stderr)
	}
	return string(res.Stdout)
}

// folderState is every name in dir with its content (files) or target
// (links), to compare before and after.
func folderState(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		b.WriteString(p + " " + fi.Mode().String())
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			b.WriteString(" -> " + l)
		case fi.Mode().IsRegular():
			c, _ := os.ReadFile(p)
			b.WriteString(" " + string(c))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// A read-only folder cannot be changed from the guest, even by its root
// after it remounts the folder read-write: the host refuses the writes.
// A writable one shows the guest's files on the host at once, owned by
// the folder's owner, and the host's to the guest. Snapshots are refused.
func TestMountReadOnlyAndWritable(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	ro, rw := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(ro, "a.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(ro, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The writable folder belongs to someone other than the caller.
	const uid, gid = 4321, 5432
	if err := os.Chown(rw, uid, gid); err != nil {
		t.Fatal(err)
	}
	before := folderState(t, ro)
	vm := newVM(t, smolvm.Config{Home: home, Mounts: []smolvm.Mount{
		{HostPath: ro, GuestPath: "/data", ReadOnly: true},
		{HostPath: rw, GuestPath: "/work/out"},
	}})

	if got := mountOK(t, ctx, vm, "cat /data/a.txt"); got != "from the host\n" {
		t.Errorf("guest reads %q from the read-only folder", got)
	}
	for _, w := range []string{"echo x > /data/new", "echo x >> /data/a.txt", "rm /data/a.txt", "mkdir /data/d",
		"mv /data/a.txt /data/b.txt", "rmdir /data/sub", "chmod 777 /data/a.txt", "touch /data/a.txt", "ln -s x /data/l"} {
		if res := mountRun(t, ctx, vm, w); res.ExitCode == 0 {
			t.Errorf("guest root could %q on a read-only folder", w)
		}
	}
	// The guest's own mount flag is not what protects the folder.
	mountOK(t, ctx, vm, "mount -o remount,rw /data && grep ' /data ' /proc/mounts | grep -q rw,")
	for _, w := range []string{"echo x > /data/new", "echo x >> /data/a.txt", "rm /data/a.txt", "mkdir /data/d", "touch /data/a.txt"} {
		res := mountRun(t, ctx, vm, w)
		if res.ExitCode == 0 {
			t.Errorf("guest root could %q after remounting the folder read-write", w)
		} else if !strings.Contains(string(res.Stderr), "Read-only file system") {
			t.Errorf("%q after remount: stderr %q; want the host's EROFS", w, res.Stderr)
		}
	}
	if after := folderState(t, ro); after != before {
		t.Errorf("the read-only folder changed:\nbefore %s\nafter  %s", before, after)
	}

	// Guest → host, at once (no wait: the write is through when the
	// command ends), owned by the folder's owner.
	mountOK(t, ctx, vm, "echo from the guest > /work/out/g.txt && mkdir /work/out/d && echo deep > /work/out/d/f")
	for _, c := range []struct{ path, want string }{{"g.txt", "from the guest\n"}, {"d/f", "deep\n"}} {
		p := filepath.Join(rw, c.path)
		b, err := os.ReadFile(p)
		if err != nil || string(b) != c.want {
			t.Errorf("host reads %s: %q, %v; want %q", c.path, b, err, c.want)
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != uid || st.Gid != gid {
			t.Errorf("%s made by the guest belongs to %d:%d on the host; want the folder's owner %d:%d", c.path, st.Uid, st.Gid, uid, gid)
		}
	}
	// Host → guest.
	if err := os.WriteFile(filepath.Join(rw, "h.txt"), []byte("host wrote\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var got string
	if err := testutil.Poll(30*time.Second, func() bool {
		got = string(mountRun(t, ctx, vm, "cat /work/out/h.txt 2>/dev/null").Stdout)
		return got == "host wrote\n"
	}); err != nil {
		t.Errorf("guest reads %q of a file the host wrote: %v", got, err)
	}
	mountOK(t, ctx, vm, "rm /work/out/g.txt")
	if _, err := os.Stat(filepath.Join(rw, "g.txt")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a file the guest removed is still on the host (%v)", err)
	}

	_, err := vm.Snapshot(ctx, "withmounts")
	if !errors.Is(err, smolvm.ErrUnsupported) || !strings.Contains(err.Error(), "host folders") {
		t.Errorf("Snapshot of a VM with host folders = %v; want ErrUnsupported naming host folders", err)
	}
}

// The guest reaches nothing outside a shared folder: not through
// symbolic links the host made (they resolve in the guest), not through
// ones it makes itself, not through '..', not through a hard link, and
// not through a device node of the host's.
func TestMountEscape(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	base := t.TempDir()
	share := filepath.Join(base, "share")
	secret := filepath.Join(base, "secret")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secret, []byte("host secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{"etc": "/etc", "up": "..", "abs": secret, "rel": "../secret"} {
		if err := os.Symlink(target, filepath.Join(share, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mknod(filepath.Join(share, "null"), syscall.S_IFCHR|0o666, int(1<<8|3)); err != nil {
		t.Fatal(err)
	}
	vm := newVM(t, smolvm.Config{Home: home, Mounts: []smolvm.Mount{{HostPath: share, GuestPath: "/s"}}})
	// What the guest's own / holds, so that a read through a link can
	// be told from a read of the host.
	mountOK(t, ctx, vm, "echo guest hostname > /etc/hostname")

	// The folder's parent on the host holds "secret" and "share".
	for _, r := range []string{"cat /s/abs", "cat /s/rel", "cat /s/up/secret", "cat /s/../secret", "ls /s/up", "ls /s/.."} {
		if out := string(mountRun(t, ctx, vm, r+" 2>&1").Stdout); strings.Contains(out, "host secret") || strings.Contains(out, "share") {
			t.Errorf("%q reached the folder's parent on the host: %q", r, out)
		}
	}
	if out := mountOK(t, ctx, vm, "cat /s/etc/hostname"); out != "guest hostname\n" {
		t.Errorf("the host's link to /etc leads the guest to %q; want the guest's own /etc/hostname", out)
	}
	// Writes: through the host's links, '..', a link the guest makes.
	mountOK(t, ctx, vm, "ln -s /etc /s/guestetc && ln -s ../.. /s/guestup")
	for _, w := range []string{"echo x > /s/etc/smolvm-escape", "echo x > /s/up/smolvm-escape", "echo x > /s/../smolvm-escape",
		"echo x > /s/guestetc/smolvm-escape", "echo x > /s/guestup/smolvm-escape", "echo x > /s/rel", "echo x > /s/abs"} {
		mountRun(t, ctx, vm, w)
	}
	for _, p := range []string{"/etc/smolvm-escape", filepath.Join(base, "smolvm-escape"), filepath.Join(filepath.Dir(base), "smolvm-escape"), "/smolvm-escape"} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the guest made %s on the host (%v)", p, err)
			_ = os.Remove(p)
		}
	}
	if b, _ := os.ReadFile(secret); string(b) != "host secret\n" {
		t.Errorf("the file outside the folder now holds %q", b)
	}
	// The guest's links are links on the host, to the guest's paths.
	if l, err := os.Readlink(filepath.Join(share, "guestetc")); err != nil || l != "/etc" {
		t.Errorf("the guest's link on the host: %q, %v", l, err)
	}
	// A hard link to a file outside cannot be named from the guest; one
	// to /etc/passwd of the guest crosses file systems.
	if res := mountRun(t, ctx, vm, "ln /etc/passwd /s/passwd"); res.ExitCode == 0 {
		t.Error("guest hard-linked a file from outside the folder into it")
	}
	// Device nodes: the guest opens none through the folder (it is
	// mounted nodev; a node there would be the guest's own device
	// anyway, never the host's), and cannot make one on the host.
	if res := mountRun(t, ctx, vm, "echo x > /s/null"); res.ExitCode == 0 {
		t.Error("guest wrote to the host's device node in the folder")
	}
	if res := mountRun(t, ctx, vm, "mknod /s/mem c 1 1"); res.ExitCode == 0 {
		t.Error("guest made a device node in the folder")
	}
	if _, err := os.Lstat(filepath.Join(share, "mem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a device node the guest asked for is on the host (%v)", err)
	}
}

// A large file read through a mount arrives intact (its hash compared):
// 500 MiB, or $SMOLVM_TEST_MOUNT_MIB.
func TestMountLargeFile(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 15*time.Minute)
	size := int64(500 << 20)
	if s := os.Getenv("SMOLVM_TEST_MOUNT_MIB"); s != "" {
		mib, err := strconv.Atoi(s)
		if err != nil || mib < 1 {
			t.Fatalf("SMOLVM_TEST_MOUNT_MIB=%q: give a number of MiB", s)
		}
		size = int64(mib) << 20
	}
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := hex.EncodeToString(h.Sum(nil))
	vm := newVM(t, smolvm.Config{Home: home, Mounts: []smolvm.Mount{{HostPath: dir, GuestPath: "/big", ReadOnly: true}}})
	out := mountOK(t, ctx, vm, "sha256sum /big/big && stat -c %s /big/big")
	if fs := strings.Fields(out); len(fs) < 3 || fs[0] != want || fs[2] != strconv.FormatInt(size, 10) {
		t.Errorf("guest hashes %q; want %s of %d bytes", out, want, size)
	}
}

// fsDaemons lists the virtiofsd processes of VM id (by the folder their
// command line names: …/vms/ID/fsN).
func fsDaemons(id string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.HasPrefix(b, []byte("/usr/lib/qemu/virtiofsd\x00")) && bytes.Contains(b, []byte("/vms/"+id+"/fs")) && testutil.PidAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitNoFSDaemons(t *testing.T, id, after string) {
	t.Helper()
	if err := testutil.Poll(time.Minute, func() bool { return len(fsDaemons(id)) == 0 }); err != nil {
		t.Errorf("virtiofsd of %s left %s: pids %v", id, after, fsDaemons(id))
	}
}

// A folder's daemon runs as long as its VM: gone after stop (and back
// with start), after delete, and after the supervisor is killed.
func TestMountDaemonCleanup(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 15*time.Minute)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("ok\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := smolvm.Config{Home: home, Persistent: true, Mounts: []smolvm.Mount{{HostPath: dir, GuestPath: "/m"}}}
	vm := newVM(t, cfg)
	id := vm.ID()
	pids := fsDaemons(id)
	if len(pids) == 0 {
		t.Fatal("no virtiofsd runs for the VM")
	}
	// Least privilege: the daemon that serves (the last one forked) has
	// namespaces of its own.
	slices.Sort(pids)
	for _, ns := range []string{"user", "mnt", "pid", "net"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		theirs, err := os.Readlink("/proc/" + strconv.Itoa(pids[len(pids)-1]) + "/ns/" + ns)
		if err == nil && theirs == mine {
			t.Errorf("virtiofsd shares the host's %s namespace", ns)
		}
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoFSDaemons(t, id, "after stop")
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := mountOK(t, ctx, vm, "cat /m/f"); got != "ok\n" {
		t.Errorf("after start the guest reads %q", got)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoFSDaemons(t, id, "after delete")

	vm2 := newVM(t, cfg)
	in, err := vm2.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(fsDaemons(vm2.ID())) == 0 {
		t.Fatal("no virtiofsd runs for the second VM")
	}
	if err := syscall.Kill(in.SupervisorPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitNoFSDaemons(t, vm2.ID(), "after its supervisor was killed")
	if _, err := smolvm.Cleanup(ctx, smolvm.CleanupOptions{Home: home}); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, home)
}

// Bad host folders and guest paths are refused before anything is made.
func TestMountBadInput(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 5*time.Minute)
	ok := t.TempDir()
	file := filepath.Join(ok, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	closed := t.TempDir()
	if err := os.Chmod(closed, 0); err != nil {
		t.Fatal(err)
	}
	readOnly := t.TempDir()
	if err := os.Chmod(readOnly, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(closed, 0o700); _ = os.Chmod(readOnly, 0o700) })
	for _, c := range []struct {
		name   string
		mounts []smolvm.Mount
		want   string
	}{
		{"missing folder", []smolvm.Mount{{HostPath: filepath.Join(ok, "nope"), GuestPath: "/m"}}, "does not exist"},
		{"a file", []smolvm.Mount{{HostPath: file, GuestPath: "/m"}}, "not a folder"},
		{"unreadable", []smolvm.Mount{{HostPath: closed, GuestPath: "/m", ReadOnly: true}}, "not readable"},
		{"not writable", []smolvm.Mount{{HostPath: readOnly, GuestPath: "/m"}}, "not readable and writable"},
		{"state folder", []smolvm.Mount{{HostPath: home, GuestPath: "/m"}}, "state folder"},
		{"root", []smolvm.Mount{{HostPath: ok, GuestPath: "/"}}, "system folder"},
		{"etc", []smolvm.Mount{{HostPath: ok, GuestPath: "/etc"}}, "system folder"},
		{"usr", []smolvm.Mount{{HostPath: ok, GuestPath: "/usr"}}, "system folder"},
		{"in proc", []smolvm.Mount{{HostPath: ok, GuestPath: "/proc/x"}}, "inside /proc"},
		{"in sys", []smolvm.Mount{{HostPath: ok, GuestPath: "/sys/fs/x"}}, "inside /sys"},
		{"relative", []smolvm.Mount{{HostPath: ok, GuestPath: "m"}}, "absolute"},
		{"dot dot", []smolvm.Mount{{HostPath: ok, GuestPath: "/m/../etc"}}, "'..'"},
		{"space", []smolvm.Mount{{HostPath: ok, GuestPath: "/my dir"}}, "letters, digits"},
		{"twice", []smolvm.Mount{{HostPath: ok, GuestPath: "/m"}, {HostPath: readOnly, GuestPath: "/m", ReadOnly: true}}, "two host folders"},
	} {
		before := stateOf(t, home)
		_, err := smolvm.New(ctx, smolvm.Config{Home: home, Mounts: c.mounts})
		if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: New = %v; want ErrInvalid naming %q", c.name, err, c.want)
		}
		if after := stateOf(t, home); !after.equal(before) {
			t.Errorf("%s: left %+v", c.name, after)
		}
	}
	if _, err := smolvm.Restore(ctx, "any", smolvm.Config{Home: home, Mounts: []smolvm.Mount{{HostPath: ok, GuestPath: "/m"}}}); !errors.Is(err, smolvm.ErrUnsupported) {
		t.Errorf("Restore with host folders = %v; want ErrUnsupported", err)
	}
	assertNothingLeft(t, home)
}

// What is checked is what is mounted: a folder swapped for a link to a
// folder outside after New checked it (here by a hook; on a server, by
// anyone who can write beside it, another sandbox too) fails the boot
// with the cause named, leaves nothing, and the guest never sees the
// folder outside. Swapped before the check, a folder that must lie
// within another is refused as outside it. Not parallel: the hook is
// global.
func TestMountSwappedForLink(t *testing.T) {
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	allowed, outside := t.TempDir(), t.TempDir()
	dir := filepath.Join(allowed, "project")
	if err := os.WriteFile(filepath.Join(outside, "in"), []byte("outside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// swap replaces the folder by a link to outside.
	swap := func() {
		if err := os.Rename(dir, dir+".old"); err != nil {
			t.Error(err)
		}
		if err := os.Symlink(outside, dir); err != nil {
			t.Error(err)
		}
	}
	fresh := func() {
		for _, p := range []string{dir, dir + ".old"} {
			if err := os.RemoveAll(p); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "in"), []byte("inside\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name          string
		within        string
		before, after bool // swap before New, or after its check
		want          string
	}{
		{"within, swapped after the check", allowed, false, true, "symbolic link"},
		{"swapped after the check", "", false, true, "symbolic link"},
		{"within, swapped before", allowed, true, false, "not within"},
	} {
		fresh()
		if c.before {
			swap()
		}
		smolvm.AfterMountCheck(t, func(ms []smolvm.Mount) {
			if c.after && len(ms) == 1 && ms[0].HostPath == dir {
				swap()
			}
		})
		before := stateOf(t, home)
		vm, err := smolvm.New(ctx, smolvm.Config{Home: home, BootTimeout: testutil.BootTimeout,
			Mounts: []smolvm.Mount{{HostPath: dir, GuestPath: "/mnt", ReadOnly: true, Within: c.within}}})
		if err == nil {
			res, _ := vm.Run(ctx, "cat /mnt/in")
			_ = vm.Close()
			t.Errorf("%s: New mounted the folder; the guest reads %q", c.name, res.Stdout)
			continue
		}
		t.Logf("%s: %v", c.name, err)
		if !errors.Is(err, smolvm.ErrInvalid) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), dir) {
			t.Errorf("%s: New = %v; want ErrInvalid naming %s and %q", c.name, err, dir, c.want)
		}
		if after := stateOf(t, home); !after.equal(before) {
			t.Errorf("%s: left %+v", c.name, after)
		}
	}
	assertNothingLeft(t, home)
}

// resultText shows a command's result for a test's message.
func resultText(res *smolvm.Result) string {
	if res == nil {
		return "no result"
	}
	return "exit " + strconv.Itoa(res.ExitCode) + ", stdout " + strconv.Quote(string(res.Stdout)) + ", stderr " + strconv.Quote(string(res.Stderr))
}

// subIDStart is the first subordinate id that file (/etc/subuid or
// /etc/subgid) gives user.
func subIDStart(t *testing.T, file, user string) uint32 {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Split(line, ":"); len(f) == 3 && f[0] == user {
			n, err := strconv.ParseUint(f[1], 10, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(n)
		}
	}
	t.Fatalf("%s gives %s no range", file, user)
	return 0
}

// A guest user other than root makes, writes, renames and deletes files
// and folders in a writable folder; on the host they belong to the
// subordinate ids smolvm setup gives user smolvm (guest id N: start+N-1),
// guest root's to the folder's owner. Read-only stays read-only for both.
func TestMountNonRootUser(t *testing.T) {
	t.Parallel()
	needMounts(t)
	if err := jail.EnsureUser(); err != nil { // what smolvm setup does
		t.Fatal(err)
	}
	subUID, subGID := subIDStart(t, "/etc/subuid", jail.User), subIDStart(t, "/etc/subgid", jail.User)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	// smolvm doctor says where the guest's users' files go.
	want := "uids from " + strconv.Itoa(int(subUID)) + ", gids from " + strconv.Itoa(int(subGID))
	checks := smolvm.CheckHost(ctx, home)
	if i := slices.IndexFunc(checks, func(c smolvm.HostCheck) bool { return c.Name == "host folders" }); i < 0 {
		t.Error("smolvm doctor has no host folders line")
	} else if c := checks[i]; !c.OK || !strings.Contains(c.Detail, want) {
		t.Errorf("smolvm doctor: %+v; want OK naming %q", c, want)
	}
	ro, rw := t.TempDir(), t.TempDir()
	const uid, gid = 4321, 5432 // no user: its folder gets smolvm's range
	if err := os.Chown(rw, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(ro, 0o777); err != nil { // the mount, not the mode, refuses
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rw, "host.txt"), []byte("host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(rw, "host.txt"), uid, gid); err != nil {
		t.Fatal(err)
	}
	vm := newVM(t, smolvm.Config{Home: home, Mounts: []smolvm.Mount{
		{HostPath: ro, GuestPath: "/data", ReadOnly: true},
		{HostPath: rw, GuestPath: "/work"},
	}})
	// Root gives user 1000 a folder (chown to a mapped id).
	mountOK(t, ctx, vm, "mkdir /work/u && chown 1000:1000 /work/u && echo root > /work/r.txt")
	script := "cd /work/u && echo one > f && echo two >> f && mv f g && mkdir d && echo x > d/x && mv d e && " +
		"rm e/x && rmdir e && echo gone > h && rm h && cat g && stat -c %u:%g g . ../host.txt ../r.txt"
	res, err := vm.Run(ctx, script, smolvm.WithUser("1000:1000"))
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("guest user 1000 in the writable folder: %v, %s", err, resultText(res))
	}
	if got, want := string(res.Stdout), "one\ntwo\n1000:1000\n1000:1000\n0:0\n0:0\n"; got != want {
		t.Errorf("guest user 1000 sees %q; want %q (its own ids, root's for the owner's files)", got, want)
	}
	for _, c := range []struct {
		path     string
		uid, gid uint32
	}{{"u", subUID + 999, subGID + 999}, {"u/g", subUID + 999, subGID + 999}, {"r.txt", uid, gid}} {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(rw, c.path), &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != c.uid || st.Gid != c.gid {
			t.Errorf("%s belongs to %d:%d on the host; want %d:%d", c.path, st.Uid, st.Gid, c.uid, c.gid)
		}
	}
	if b, err := os.ReadFile(filepath.Join(rw, "u", "g")); err != nil || string(b) != "one\ntwo\n" {
		t.Errorf("host reads %q, %v", b, err)
	}
	for _, gone := range []string{"u/f", "u/d", "u/e", "u/h"} {
		if _, err := os.Lstat(filepath.Join(rw, gone)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is on the host (%v); the guest renamed or removed it", gone, err)
		}
	}
	// The owner's files stay the owner's: user 1000 is refused by their
	// mode (not an error of the mapping).
	if res, err := vm.Run(ctx, "echo x >> /work/host.txt; touch /work/new", smolvm.WithUser("1000:1000")); err != nil ||
		res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "Permission denied") {
		t.Errorf("guest user 1000 writing the owner's file: %v, %s; want Permission denied", err, resultText(res))
	}
	for _, user := range []string{"0:0", "1000:1000"} {
		res, err := vm.Run(ctx, "touch /data/new", smolvm.WithUser(user))
		if err != nil || res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "Read-only file system") {
			t.Errorf("guest %s writing the read-only folder: %v, %s; want refused", user, err, resultText(res))
		}
	}
	if _, err := os.Stat(filepath.Join(ro, "new")); err == nil {
		t.Error("a guest write reached the read-only folder")
	}
}

// Host folders work in a VM of a disk image (the Debian image, its disk
// isolated): the agent mounts them in the image's root, where guest
// root reads and writes them and a user of the image's makes files.
func TestMountWithImageDisk(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	debianImage(t, home, "deb")
	ctx := testutil.Context(t, 10*time.Minute)
	ro, rw := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(ro, "a.txt"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(rw, 0o777); err != nil {
		t.Fatal(err)
	}
	vm := newVM(t, smolvm.Config{Home: home, Image: "deb", Mounts: []smolvm.Mount{
		{HostPath: ro, GuestPath: "/srv/in", ReadOnly: true},
		{HostPath: rw, GuestPath: "/home/out"},
	}})
	if got := mountOK(t, ctx, vm, "grep PRETTY_NAME /etc/os-release >&2; cat /srv/in/a.txt && echo root > /home/out/r.txt && ls -ld /home/out >&2"); got != "from the host\n" {
		t.Errorf("guest reads %q", got)
	}
	if res := mountRun(t, ctx, vm, "touch /srv/in/x"); res.ExitCode == 0 {
		t.Error("guest root wrote the read-only folder")
	}
	res, err := vm.Run(ctx, "echo user > /home/out/u.txt && id -u", smolvm.WithUser("nobody"))
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("the image's user nobody in the writable folder: %v, %s", err, resultText(res))
	}
	for name, want := range map[string]string{"r.txt": "root\n", "u.txt": "user\n"} {
		if b, err := os.ReadFile(filepath.Join(rw, name)); err != nil || string(b) != want {
			t.Errorf("host reads %s: %q, %v; want %q", name, b, err, want)
		}
	}
}

// setIDProgram tries, in the folder it is given, the calls that would
// leave a setuid or setgid file or file capabilities, as install -m and
// setcap do (the default guest image has neither tool), and prints what
// each returned.
const setIDProgram = `package main

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

func main() {
	dir := os.Args[1]
	try := func(name string, err error) { fmt.Printf("%s: %v\n", name, err) }
	fd, err := syscall.Open(filepath.Join(dir, "o"), syscall.O_CREAT|syscall.O_WRONLY, 0o4755)
	try("open O_CREAT 4755", err)
	fd, err = syscall.Open(filepath.Join(dir, "i"), syscall.O_CREAT|syscall.O_WRONLY, 0o755)
	if err == nil {
		err = syscall.Fchmod(fd, 0o6755) // install -m 6755
	}
	try("fchmod 6755", err)
	try("setxattr user", syscall.Setxattr(filepath.Join(dir, "i"), "user.x", []byte("1"), 0))
	// cap_setuid+ep, as setcap writes it (VFS_CAP_REVISION_2).
	caps := []byte{1, 0, 0, 2, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	try("setxattr security.capability", syscall.Setxattr(filepath.Join(dir, "i"), "security.capability", caps, 0))
}
`

// buildSetIDProgram compiles setIDProgram into a static binary in a
// folder of its own.
func buildSetIDProgram(t *testing.T) string {
	t.Helper()
	src, dir := filepath.Join(t.TempDir(), "main.go"), t.TempDir()
	if err := os.WriteFile(src, []byte(setIDProgram), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, "setid"), src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the guest program: %v\n%s", err, out)
	}
	return dir
}

// In a writable folder that root owns on the host, the guest's root
// (the folder's owner there) cannot leave a setuid or setgid file: not
// by chmod, open with O_CREAT, fchmod (install -m), cp -p of a setuid
// file of its own, mknod, nor a setgid folder; nor can it write
// extended attributes (file capabilities); a plain chmod works.
func TestMountNoSetID(t *testing.T) {
	t.Parallel()
	needMounts(t)
	home := testutil.Home(t)
	ctx := testutil.Context(t, 10*time.Minute)
	rw := t.TempDir() // root's, as the test runs as root
	prog := buildSetIDProgram(t)
	vm := newVM(t, smolvm.Config{Home: home, Mounts: []smolvm.Mount{
		{HostPath: rw, GuestPath: "/work/rw"},
		{HostPath: prog, GuestPath: "/opt/setid", ReadOnly: true},
	}})

	mountOK(t, ctx, vm, "cd /work/rw && echo '#!/bin/sh' > f && chmod 0755 f && mkdir d && "+
		"cp /bin/busybox /tmp/sb && chmod 4755 /tmp/sb && test -u /tmp/sb")
	for _, w := range []string{
		"chmod 4755 /work/rw/f", "chmod g+s /work/rw/f", "chmod u+s,g+s /work/rw/f", "chmod 2755 /work/rw/d",
		"cp -p /tmp/sb /work/rw/c", "mknod -m 4755 /work/rw/n p",
	} {
		res := mountRun(t, ctx, vm, w)
		t.Logf("%s: exit %d %s", w, res.ExitCode, strings.TrimSpace(string(res.Stderr)))
		if res.ExitCode == 0 {
			t.Errorf("guest root could %q", w)
		} else if !strings.Contains(string(res.Stderr), "not permitted") {
			t.Errorf("%q: stderr %q; want EPERM", w, res.Stderr)
		}
	}
	out := mountOK(t, ctx, vm, "/opt/setid/setid /work/rw")
	t.Logf("guest program:\n%s", out)
	for _, want := range []string{"open O_CREAT 4755: operation not permitted", "fchmod 6755: operation not permitted"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("guest program: want %q", want)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(l, "setxattr") && strings.HasSuffix(l, ": <nil>") {
			t.Errorf("guest root wrote an extended attribute in the host folder: %s", l)
		}
	}
	err := filepath.Walk(rw, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode()&(os.ModeSetuid|os.ModeSetgid) != 0 {
			t.Errorf("%s has mode %v on the host", p, fi.Mode())
		}
		if n, _ := syscall.Listxattr(p, make([]byte, 256)); n > 0 && p != rw {
			t.Errorf("%s has extended attributes on the host", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(rw, "f")); err != nil || fi.Mode() != 0o755 {
		t.Errorf("f on the host: %v %v; want 0755 (the guest's plain chmod)", fi.Mode(), err)
	}
}
