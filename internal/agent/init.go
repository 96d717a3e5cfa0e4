package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/wire"
)

// bootParams holds the smolvm.* options of the kernel command line.
type bootParams struct {
	hostname string
	debug    bool
}

func readBootParams() bootParams {
	var bp bootParams
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return bp
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case wire.ParamHostname:
			bp.hostname = v
		case wire.ParamDebug:
			bp.debug = v == "1" || v == "true" || v == "yes"
		}
	}
	return bp
}

type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	optional               bool
}

var pid1Mounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", false},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "ptmxmode=0666,mode=0620", false},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", false},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", true},
}

// mounted returns the mount points listed in /proc/self/mounts.
func mounted() map[string]bool {
	m := map[string]bool{}
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return m
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fs := strings.Fields(sc.Text()); len(fs) > 1 {
			m[fs[1]] = true
		}
	}
	return m
}

// initSystem does the work of PID 1 before the agent serves: file systems,
// console logging, environment, kernel modules, hostname and loopback. It
// returns the logger; failures are logged, not fatal.
func initSystem() *slog.Logger {
	var errs []error
	for _, m := range pid1Mounts {
		if mounted()[m.target] {
			continue
		}
		if err := os.MkdirAll(m.target, 0o755); err != nil && !m.optional {
			errs = append(errs, fmt.Errorf("mkdir %s: %w", m.target, err))
			continue
		}
		err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		if err != nil && !errors.Is(err, unix.EBUSY) && !m.optional {
			errs = append(errs, fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err))
		}
	}
	devLinks := [][2]string{
		{"pts/ptmx", "/dev/ptmx"},
		{"/proc/self/fd", "/dev/fd"},
		{"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"},
		{"/proc/self/fd/2", "/dev/stderr"},
	}
	for _, l := range devLinks {
		if _, err := os.Lstat(l[1]); errors.Is(err, os.ErrNotExist) {
			_ = os.Symlink(l[0], l[1])
		}
	}

	bp := readBootParams()
	var out io.Writer = os.Stderr
	if c, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0); err == nil {
		// Panics and stray writes of PID 1 go to the console too.
		for fd := 0; fd < 3; fd++ {
			_ = unix.Dup3(int(c.Fd()), fd, 0)
		}
		out = c
	}
	level := slog.LevelInfo
	if bp.debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)
	log.Debug("init: mounts and console ready", "uptime", uptime())
	w := watchSteps(log, initStepWarn)
	defer w.done()
	for _, err := range errs {
		log.Error("init", "err", err)
	}

	for k, v := range map[string]string{"PATH": DefaultPath, "HOME": "/root"} {
		if err := os.Setenv(k, v); err != nil {
			log.Warn("set "+k, "err", err)
		}
	}
	if err := os.MkdirAll("/root", 0o700); err != nil {
		log.Warn("create /root", "err", err)
	}
	if bp.hostname != "" {
		if err := unix.Sethostname([]byte(bp.hostname)); err != nil {
			log.Warn("set hostname", "hostname", bp.hostname, "err", err)
		}
	}
	late := loadModules(log, DefaultModulesFile, w.enter)
	go func() {
		for _, p := range late {
			if err := loadModule(p); err != nil {
				log.Error("load kernel module", "path", p, "err", err)
			}
		}
	}()
	w.enter("bring up lo")
	if err := linkUp("lo"); err != nil {
		log.Warn("bring up lo", "err", err)
	}
	w.enter("configure eth0")
	configureNetwork(log) // net.go: eth0 from smolvm.net=
	log.Debug("init done", "uptime", uptime())
	return log
}

// uptime is the time since the guest kernel started (CLOCK_BOOTTIME), for
// logs that place agent phases on the boot's timeline.
//
// It is a raw system call, as is uname in Ping: neither blocks, and under
// emulation the runtime's syscall entry and exit cost about as much again
// as the call (measured in the guest: 0.5–0.9 µs raw, 1.4–2.3 µs not).
func uptime() time.Duration {
	var ts unix.Timespec
	_, _, errno := unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_BOOTTIME, uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		return 0
	}
	return time.Duration(ts.Nano())
}

// deviceModules maps a virtio device id to the modules (dependencies
// first) that drive it. A module of this table is loaded only when its
// device is present: each load costs tens of milliseconds of boot time
// under software emulation.
var deviceModules = map[int][]string{
	1:  {"failover", "net_failover", "virtio_net"},
	2:  {"virtio_blk"},
	3:  {"virtio_console"},
	4:  {"virtio_rng"},
	19: {"vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
	26: {"fuse", "virtiofs"}, // host folders (mount.go)
}

// pciModules are needed only on machines with a PCI bus.
var pciModules = map[string]bool{"virtio_pci_legacy_dev": true, "virtio_pci_modern_dev": true, "virtio_pci": true}

// lateModules are loaded after the agent serves (nothing at boot needs them).
var lateModules = map[string]bool{"overlay": true}

func moduleName(path string) string {
	n := filepath.Base(path)
	for _, ext := range []string{".xz", ".zst", ".gz", ".ko"} {
		n = strings.TrimSuffix(n, ext)
	}
	return strings.ReplaceAll(n, "-", "_")
}

// virtioDevices returns the device ids on the virtio bus.
func virtioDevices() map[int]bool {
	ids := map[int]bool{}
	files, _ := filepath.Glob("/sys/bus/virtio/devices/*/device")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var id int
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "0x%x", &id); err == nil {
			ids[id] = true
		}
	}
	return ids
}

// loadModules loads the kernel modules listed one path per line (in
// dependency order): first the bus drivers, then the drivers of the virtio
// devices that are present, telling enter of each. It returns the modules
// left for later.
func loadModules(log *slog.Logger, list string, enter func(step string)) []string {
	data, err := os.ReadFile(list)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("read module list", "path", list, "err", err)
		}
		return nil
	}
	var paths []string
	for _, line := range strings.Split(string(data), "\n") {
		if p := strings.TrimSpace(line); p != "" && !strings.HasPrefix(p, "#") {
			paths = append(paths, p)
		}
	}
	byDevice := map[string]int{}
	for id, mods := range deviceModules {
		for _, m := range mods {
			byDevice[m] = id
		}
	}
	entries, _ := os.ReadDir("/sys/bus/pci/devices")
	hasPCI := len(entries) > 0
	load := func(p string) {
		enter("load kernel module " + p)
		if err := loadModule(p); err != nil {
			log.Error("load kernel module", "path", p, "err", err)
		} else {
			log.Debug("loaded kernel module", "path", p)
		}
	}
	// Bus drivers and everything not tied to a device.
	var late []string
	for _, p := range paths {
		n := moduleName(p)
		switch _, dev := byDevice[n]; {
		case dev:
		case lateModules[n]:
			late = append(late, p)
		case pciModules[n] && !hasPCI:
		default:
			load(p)
		}
	}
	present := virtioDevices()
	for _, p := range paths {
		if id, ok := byDevice[moduleName(p)]; ok && present[id] {
			load(p)
		}
	}
	return late
}

func loadModule(p string) error {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	flags := 0
	switch filepath.Ext(p) {
	case ".xz", ".zst", ".gz":
		flags |= unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = unix.FinitModule(fd, moduleParams(p), flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// moduleParams returns the module's options from the kernel command line
// (name.param=value), as modprobe would pass them: the kernel applies such
// options only to built-in code, not to modules loaded later. QEMU's microvm
// describes its virtio-mmio devices this way (virtio_mmio.device=…).
func moduleParams(path string) string {
	name := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	name = strings.TrimSuffix(name, ".ko")
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return ""
	}
	norm := func(s string) string { return strings.ReplaceAll(s, "-", "_") }
	var params []string
	for _, f := range strings.Fields(string(b)) {
		mod, param, ok := strings.Cut(f, ".")
		if ok && norm(mod) == norm(name) && param != "" {
			params = append(params, param)
		}
	}
	return strings.Join(params, " ")
}

// linkUp sets IFF_UP on an interface with ioctls (no shelling out).
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("get flags of %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("set flags of %s: %w", name, err)
	}
	return nil
}

// powerOff ends the machine: it kills every other process, syncs, tries to
// remount / read-only and powers off or reboots. It returns only on failure.
func powerOff(reboot bool) error {
	_ = unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	return unix.Reboot(cmd)
}
