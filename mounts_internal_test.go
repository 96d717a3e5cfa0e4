package smolvm

import (
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/engine"

	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
)

func TestParseMount(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Mount
		err  bool
	}{
		{"/src:/work", Mount{HostPath: "/src", GuestPath: "/work", ReadOnly: true}, false},
		{"/src:/work:ro", Mount{HostPath: "/src", GuestPath: "/work", ReadOnly: true}, false},
		{"/src:/work:rw", Mount{HostPath: "/src", GuestPath: "/work"}, false},
		{"./rel:/w", Mount{HostPath: "./rel", GuestPath: "/w", ReadOnly: true}, false},
		{"/a:b:/w:rw", Mount{HostPath: "/a:b", GuestPath: "/w"}, false}, // a host path may hold ':'
		{"/src", Mount{}, true},
		{":/w", Mount{}, true},
		{"/src:", Mount{}, true},
		{"/src::rw", Mount{}, true},
	} {
		got, err := ParseMount(c.in)
		if c.err {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseMount(%q) = %+v, %v; want ErrInvalid", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseMount(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

func TestCheckMountPoint(t *testing.T) {
	for _, ok := range []string{"/work", "/mnt/src", "/home/user/project", "/tmp", "/srv/a.b_c-d+e@f~g", "/etcetera", "/usr2"} {
		if err := checkMountPoint(ok); err != nil {
			t.Errorf("checkMountPoint(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "work", "/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev",
		"/proc/1", "/sys/fs/cgroup", "/dev/shm", "/run/x", "/work/", "/a//b", "/a/./b", "/a/../b", "/my dir", "/a:b", "/a,b",
		"/" + string(make([]byte, 200))} {
		if err := checkMountPoint(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("checkMountPoint(%q) = %v; want ErrInvalid", bad, err)
		}
	}
}

// cleanup and rm -f find a virtiofsd a crash left by the folder its
// command line names, and leave others alone.
func TestKillStrayFSDaemons(t *testing.T) {
	home := t.TempDir()
	dir := filepath.Join(home, "vms", "aaaaaaaaaaaa")
	if err := os.MkdirAll(filepath.Join(dir, "fs0"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := func(id string) *exec.Cmd {
		// A shell waiting on its stdin, named as a VM's virtiofsd.
		cmd := exec.Command("/bin/sh")
		cmd.Args = []string{qemu.Virtiofsd, "-c", "read x", "--fd=3", "-o", "source=" + filepath.Join(home, "vms", id, "fs0")}
		if _, err := cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill() })
		return cmd
	}
	mine, other := start("aaaaaaaaaaaa"), start("bbbbbbbbbbbb")
	waited := make(chan error, 1)
	go func() { waited <- mine.Wait() }()
	engine.KillStrayHypervisor(0, "aaaaaaaaaaaa", dir) // what cleanup and rm -f call
	select {
	case werr := <-waited: // a *exec.ExitError: killed by a signal
		if ws, ok := mine.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
			t.Errorf("the VM's stray virtiofsd: %v (%v); want killed", mine.ProcessState, werr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the VM's stray virtiofsd still runs")
	}
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("another VM's virtiofsd was killed: %v", err)
	}
}

// A mount that must lie within a folder is refused when its host path,
// once resolved, does not; the folder is kept resolved for the bind.
func TestCheckWithin(t *testing.T) {
	allowed, outside := t.TempDir(), t.TempDir()
	link := filepath.Join(allowed, "out")
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	in := filepath.Join(allowed, "in")
	if err := os.Mkdir(in, 0o755); err != nil {
		t.Fatal(err)
	}
	viaLink := filepath.Join(t.TempDir(), "allowed")
	if err := os.Symlink(allowed, viaLink); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{in, allowed} {
		w, err := checkWithin(Mount{HostPath: host, Within: viaLink}, host)
		if err != nil || w != allowed {
			t.Errorf("checkWithin(%s within %s) = %q, %v; want %s", host, viaLink, w, err, allowed)
		}
	}
	for _, host := range []string{outside, filepath.Dir(allowed), allowed + "x"} {
		if _, err := checkWithin(Mount{HostPath: link, Within: allowed}, host); !errors.Is(err, ErrInvalid) {
			t.Errorf("checkWithin(%s within %s) = %v; want ErrInvalid", host, allowed, err)
		}
	}
	if _, err := checkWithin(Mount{HostPath: in, Within: "rel"}, in); !errors.Is(err, ErrInvalid) {
		t.Errorf("checkWithin of a relative folder = %v; want ErrInvalid", err)
	}
}

// A check of mounts already checked follows no link that appeared since:
// New checks a config more than once, and the first resolution stands.
func TestCheckMountsAgain(t *testing.T) {
	base, outside := t.TempDir(), t.TempDir()
	dir := filepath.Join(base, "project")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c := &Config{Home: t.TempDir(), Mounts: []Mount{{HostPath: dir, GuestPath: "/w", Within: base}}}
	first := checkMounts(c)
	if first != nil && !errors.Is(first, ErrUnsupported) { // not root, or no virtiofsd
		t.Fatal(first)
	}
	if !c.Mounts[0].resolved && first == nil {
		t.Fatal("checkMounts did not mark the mount resolved")
	}
	if err := os.Rename(dir, dir+".old"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, dir); err != nil {
		t.Fatal(err)
	}
	m := Mount{HostPath: dir, GuestPath: "/w", resolved: true}
	if _, err := checkHostFolder(m, c.Home); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("a second check of a folder swapped for a link = %v; want ErrInvalid naming the link", err)
	}
	if _, err := checkWithin(Mount{HostPath: dir, Within: dir, resolved: true}, outside); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("a second check of a Within swapped for a link = %v; want ErrInvalid naming the link", err)
	}
}
