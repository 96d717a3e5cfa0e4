// Package jail runs a process with least privilege on the host, as
// Firecracker's jailer does for its VMM: under an unprivileged user, in
// a cgroup of its own with memory, CPU and pids limits, and in a mount
// namespace whose root holds only the files it needs, bound at their
// own paths (so its argv needs no change), plus a pid namespace of its
// own (it cannot signal or see any other process of the host).
//
// Everything is set up without a helper process: a goroutine locked to
// its OS thread moves that thread into the cgroup (v1) and a new mount
// namespace, builds the root there, and starts the process from that
// thread, which the child inherits; Go's fork then changes root, drops
// the user and sets the parent-death signal between fork and exec. The
// thread is never unlocked, so it ends with the goroutine, and the
// namespace lives exactly as long as the process: nothing of it is left
// on the host.
package jail

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// User is the system user jailed processes run as; `smolvm setup`
// creates it when it is missing.
const User = "smolvm"

// Jail describes where and as whom a process runs.
type Jail struct {
	// UID and GID the process runs as; 0 keeps the caller's.
	UID, GID uint32
	// Groups are its supplementary groups (none when empty).
	Groups []uint32
	// Root is an empty folder that the jail's root is mounted on inside
	// its mount namespace ("" runs without a mount namespace).
	Root string
	// ReadOnly and Writable are host paths (files or folders) bound into
	// the jail at the same path.
	ReadOnly, Writable []string
	// Devices are device nodes bound into the jail (e.g. /dev/kvm).
	Devices []string
	// Binds are host folders bound elsewhere in the jail (userns.go).
	Binds []Bind
	// Proc mounts a proc file system at /proc in the jail (of the
	// caller's pid namespace, processes of other users hidden): for a
	// process that makes its own pid namespace and mounts its own proc
	// over it, which the kernel allows only where a proc is visible.
	Proc bool
	// UserNS, when set, runs the process as root of a user namespace
	// mapped to these host ids (userns.go) instead of as UID and GID.
	UserNS *IDMap
	// Cgroup, when set, is the cgroup the process starts in.
	Cgroup *Cgroup
	// NoSetID runs the process under a seccomp filter that refuses
	// (EPERM) to give any file a setuid or setgid bit, or an extended
	// attribute (setid.go): for a process that writes files on behalf
	// of someone less trusted, as virtiofsd does for a guest.
	NoSetID bool
}

// systemDirs are bound read-only into every jail (what a dynamically
// linked program and its loader read): where the host has them as
// symbolic links (merged /usr), the links are made instead.
var systemDirs = []string{"/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ld.so.cache"}

// baseDevices are bound into every jail.
var baseDevices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}

// Start starts cmd in the jail. cmd.SysProcAttr is extended (its
// Pdeathsig and Setpgid are kept); cmd.Dir must be a path inside the
// jail. Call release once cmd has been waited for: the thread that
// started the process lives until then, because a parent-death signal
// fires when the parent thread ends, not the parent process.
func (j *Jail) Start(cmd *exec.Cmd) (release func(), err error) {
	errc := make(chan error, 1)
	done := make(chan struct{})
	go onThreadOfItsOwn(func() {
		err := j.start(cmd)
		errc <- err
		if err != nil {
			return
		}
		if j.Cgroup != nil {
			// Only the process stays in its cgroup, not this thread.
			// After Start has returned: a move between v1 cgroups
			// can wait for an RCU grace period, milliseconds that
			// need not delay the process.
			j.Cgroup.leaveThread()
		}
		<-done
	})
	if err := <-errc; err != nil {
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(func() { close(done) }) }, nil
}

// onThreadOfItsOwn runs f on an OS thread that ends when f returns, so
// that what f changes about its thread (namespaces, cgroups) goes with
// it. The main thread never ends (the runtime parks it for good when a
// goroutine exits locked to it): there, f runs on a goroutine started
// while the main thread is taken, which therefore gets another thread.
func onThreadOfItsOwn(f func()) {
	runtime.LockOSThread() // never unlocked on another thread than main
	if unix.Gettid() != unix.Getpid() {
		f()
		return
	}
	started := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		close(started)
		f()
	}()
	<-started // the main thread was taken until the goroutine had its own
	runtime.UnlockOSThread()
}

func (j *Jail) start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	attr := cmd.SysProcAttr
	if j.Cgroup != nil {
		if err := j.Cgroup.enterThread(attr); err != nil {
			return err
		}
	}
	if j.Root != "" {
		if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
			return fmt.Errorf("jail: new mount namespace: %w", err)
		}
		if err := j.buildRoot(); err != nil {
			return err
		}
		attr.Chroot = j.Root
		attr.Cloneflags |= unix.CLONE_NEWPID | unix.CLONE_NEWIPC
	}
	if j.UserNS != nil {
		j.UserNS.userNS(attr)
	} else if j.UID != 0 || j.GID != 0 {
		attr.Credential = &syscall.Credential{Uid: j.UID, Gid: j.GID, Groups: append([]uint32{}, j.Groups...)}
	}
	if j.NoSetID {
		// Last: only the process needs it, and this thread ends with it.
		if err := noSetID(); err != nil {
			return err
		}
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	return nil
}

// buildRoot mounts a read-only tmpfs on j.Root, in the thread's new
// mount namespace, with every bound path at its own path.
func (j *Jail) buildRoot() error {
	// Mounts made here must not propagate to the host's namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("jail: make mounts private: %w", err)
	}
	if err := unix.Mount("smolvm-jail", j.Root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755,size=64k,nr_inodes=4096"); err != nil {
		return fmt.Errorf("jail: mount root: %w", err)
	}
	for _, p := range systemDirs {
		fi, err := os.Lstat(p)
		switch {
		case err != nil:
			continue
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return fmt.Errorf("jail: %w", err)
			}
			if err := j.mkparent(p); err != nil {
				return err
			}
			if err := os.Symlink(target, j.Root+p); err != nil {
				return fmt.Errorf("jail: %w", err)
			}
		default:
			if err := j.bind(p, true, false); err != nil {
				return err
			}
		}
	}
	for _, p := range j.ReadOnly {
		if err := j.bind(p, true, false); err != nil {
			return err
		}
	}
	for _, p := range j.Writable {
		if err := j.bind(p, false, false); err != nil {
			return err
		}
	}
	for _, p := range append(append([]string(nil), baseDevices...), j.Devices...) {
		if err := j.bind(p, false, true); err != nil {
			return err
		}
	}
	for _, b := range j.Binds {
		if err := j.bindAt(b); err != nil {
			return err
		}
	}
	if j.Proc {
		if err := os.MkdirAll(j.Root+"/proc", 0o555); err != nil {
			return fmt.Errorf("jail: %w", err)
		}
		if err := unix.Mount("proc", j.Root+"/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=invisible"); err != nil {
			return fmt.Errorf("jail: mount proc: %w", err)
		}
	}
	if err := unix.Mount("", j.Root, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("jail: make root read-only: %w", err)
	}
	return nil
}

func (j *Jail) mkparent(p string) error {
	if err := os.MkdirAll(j.Root+filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	return nil
}

// bind binds host path p at the same path in the jail.
func (j *Jail) bind(p string, readOnly, device bool) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("jail: bind %q: not an absolute path", p)
	}
	p = filepath.Clean(p)
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("jail: bind: %w", err)
	}
	if err := j.mkparent(p); err != nil {
		return err
	}
	dst := j.Root + p
	if fi.IsDir() {
		err = os.Mkdir(dst, 0o755)
	} else {
		// mknod, not open: a file opened for writing, even for a moment,
		// can be inherited by a fork that another goroutine makes
		// meanwhile, and then the root's read-only remount fails (EBUSY).
		err = unix.Mknod(dst, unix.S_IFREG|0o644, 0)
	}
	if err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("jail: bind %s: %w", p, err)
	}
	if err := unix.Mount(p, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("jail: bind %s: %w", p, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if !device {
		flags |= unix.MS_NODEV
	}
	if err := unix.Mount("", dst, "", flags, ""); err != nil {
		return fmt.Errorf("jail: restrict bind %s: %w", p, err)
	}
	return nil
}

// Host is what this host allows for jailing processes.
type Host struct {
	// Root: the caller runs as root, so it can drop to User and make
	// mount namespaces.
	Root bool
	// UID and GID of User, when it exists.
	UID, GID uint32
	// UserErr says why User cannot be used (missing), if Root.
	UserErr error
	// IDs are the per-process uids and gids reserved for User (uids.go);
	// IDsErr says why there are none (then every process runs as User).
	IDs    IDRange
	IDsErr error
	// Cgroups is where per-process cgroups can be made.
	Cgroups CgroupSupport
}

// Usable reports whether jailed processes can run as User.
func (h *Host) Usable() bool { return h.Root && h.UserErr == nil }

// Detect reports what the host allows.
func Detect() Host {
	h := Host{Root: os.Geteuid() == 0}
	if !h.Root {
		return h
	}
	h.Cgroups = DetectCgroups()
	u, err := user.Lookup(User)
	if err != nil {
		h.UserErr = fmt.Errorf("no user %q: run 'smolvm setup' (as root) to create it", User)
		return h
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil || uid == 0 {
		h.UserErr = fmt.Errorf("user %q has uid %s: it must be an unprivileged user", User, u.Uid)
		return h
	}
	h.UID, h.GID = uint32(uid), uint32(gid)
	h.IDs, h.IDsErr = reservedIDs()
	return h
}

// EnsureUser creates User as a system user without home or login shell
// when it does not exist, and gives it subordinate ids when it has none
// (subid.go: what host folders map a guest's other users to; root only).
func EnsureUser() error {
	if _, err := user.Lookup(User); err != nil {
		out, err := exec.Command("useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", User).CombinedOutput()
		if err != nil {
			return fmt.Errorf("create user %s: %w: %s", User, err, strings.TrimSpace(string(out)))
		}
	}
	return ensureSubIDs()
}

// DisableEnv, set to "off", runs processes without a jail (to compare
// costs, or to debug a host where jailing fails).
const DisableEnv = "SMOLVM_JAIL"

// Disabled reports whether DisableEnv turns jails off.
func Disabled() bool { return os.Getenv(DisableEnv) == "off" }
