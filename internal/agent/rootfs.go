package agent

// Booting a disk image. The guest always boots the default kernel and
// initramfs; when the kernel command line names a root disk
// (smolvm.root=/dev/vda), the initramfs agent, right after initSystem has
// loaded the drivers of the present virtio devices (virtio_blk; ext4 is
// built into Debian's cloud kernel), mounts the disk on /newroot, moves
// /dev, /proc, /sys, /run and /tmp onto it, makes it the root (MS_MOVE +
// chroot, as switch_root does) and re-executes itself there as PID 1.
//
// The binary that runs as PID 1 in the disk's root is the initramfs's
// agent (kept open across the chroot and executed through /proc/self/fd),
// not the copy the image builder put at /usr/sbin/smolvm-agent: the agent
// then always matches the host that built the initramfs, whatever agent
// version an image was built with. The copy in the image is for booting
// the image some other way (init=/usr/sbin/smolvm-agent). The initramfs's
// files are not deleted (switch_root would free them): they take a few
// MiB of guest memory.
//
// smolvm.rootmode=ro mounts the disk read-only (shared disk mode: writes
// outside the tmpfs folders /tmp, /run and /dev/shm fail with EROFS).
// smolvm.rootgrow=1 grows the ext4 file system online to the size of the
// disk (EXT4_IOC_RESIZE_FS, what resize2fs does on a mounted file system).

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/wire"
)

// switchedEnv marks the agent executed after the root switch.
const switchedEnv = "SMOLVM_ROOT_SWITCHED"

// RootDeviceWait bounds the wait for the root disk's device node.
var RootDeviceWait = 30 * time.Second

type rootParams struct {
	device   string
	readOnly bool
	grow     bool
}

func readRootParams() rootParams {
	var rp rootParams
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return rp
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case wire.ParamRoot:
			rp.device = v
		case wire.ParamRootMode:
			rp.readOnly = v == "ro"
		case wire.ParamRootGrow:
			rp.grow = v == "1"
		}
	}
	return rp
}

// switchRootIfAsked switches to the root disk named on the kernel command
// line and does not return when it succeeds. Without such a disk, or in the
// agent started after the switch, it returns at once. A failed switch is
// fatal: the guest reports it on the console and powers off, so the host
// sees a boot failure naming the cause instead of a guest without its image.
func switchRootIfAsked(log *slog.Logger) {
	if os.Getenv(switchedEnv) != "" {
		if err := os.Unsetenv(switchedEnv); err != nil {
			log.Warn("unset "+switchedEnv, "err", err)
		}
		log.Debug("running on the root disk")
		return
	}
	rp := readRootParams()
	if rp.device == "" {
		return
	}
	err := switchRoot(log, rp)
	fmt.Fprintf(os.Stderr, "smolvm-agent: fatal: switch to root disk %s: %v: powering off\n", rp.device, err)
	log.Error("switch root failed, powering off", "device", rp.device, "err", err)
	if perr := powerOff(false); perr != nil {
		log.Error("power off failed", "err", perr)
	}
	select {}
}

func switchRoot(log *slog.Logger, rp rootParams) error {
	t0 := time.Now()
	deadline := time.Now().Add(RootDeviceWait)
	for {
		if _, err := os.Stat(rp.device); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("device did not appear within %s (is virtio_blk in the initramfs?)", RootDeviceWait)
		}
		time.Sleep(5 * time.Millisecond)
	}
	const newRoot = "/newroot"
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	var flags uintptr = unix.MS_NOATIME
	if rp.readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(rp.device, newRoot, "ext4", flags, ""); err != nil {
		return fmt.Errorf("mount ext4: %w", err)
	}
	if rp.grow && !rp.readOnly {
		if err := growExt4(newRoot, filepath.Base(rp.device)); err != nil {
			log.Warn("grow root file system", "err", err)
		}
	}
	if _, err := os.Stat(filepath.Join(newRoot, "bin", "sh")); err != nil {
		log.Warn("root disk has no /bin/sh: commands need absolute paths", "err", err)
	}
	for _, m := range []string{"/dev", "/proc", "/sys", "/run", "/tmp"} {
		target := newRoot + m
		if _, err := os.Stat(target); err != nil && !rp.readOnly {
			_ = os.MkdirAll(target, 0o755)
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", m, err)
		}
	}
	// Keep this binary reachable after the chroot.
	self, err := unix.Open("/init", unix.O_RDONLY, 0)
	if err != nil {
		if self, err = unix.Open("/proc/self/exe", unix.O_RDONLY, 0); err != nil {
			return fmt.Errorf("open the agent binary: %w", err)
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the root disk to /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	log.Debug("switched root", "device", rp.device, "ro", rp.readOnly, "took", time.Since(t0))
	env := append(os.Environ(), switchedEnv+"=1")
	err = unix.Exec(fmt.Sprintf("/proc/self/fd/%d", self), []string{"/init"}, env)
	return fmt.Errorf("execute the agent in the new root: %w", err)
}

// growExt4 grows the ext4 file system mounted on dir to the size of the
// block device dev (a name in /sys/block).
func growExt4(dir, dev string) error {
	b, err := os.ReadFile(filepath.Join("/sys/block", dev, "size"))
	if err != nil {
		return err
	}
	var sectors uint64
	if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &sectors); err != nil {
		return fmt.Errorf("size of %s: %w", dev, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return err
	}
	if st.Bsize <= 0 {
		return fmt.Errorf("block size %d", st.Bsize)
	}
	blocks := sectors * 512 / uint64(st.Bsize)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	const ext4IocResizeFS = 0x40086610 // _IOW('f', 16, __u64)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ext4IocResizeFS, uintptr(unsafe.Pointer(&blocks))); e != 0 {
		return fmt.Errorf("EXT4_IOC_RESIZE_FS to %d blocks: %w", blocks, e)
	}
	return nil
}
