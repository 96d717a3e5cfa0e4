package image

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// bootInitSource is a tiny PID 1 for the boot test: it loads the modules
// listed in /etc/smolvm/modules, waits for virtio-serial ports, prints them
// after SMOLVM-BOOT-OK and powers off.
const bootInitSource = `package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	_ = unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	_ = unix.Mount("proc", "/proc", "proc", 0, "")
	_ = unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	con, err := os.OpenFile("/dev/console", os.O_WRONLY, 0)
	if err != nil {
		con = os.Stdout
	}
	list, err := os.ReadFile("/etc/smolvm/modules")
	if err != nil {
		fmt.Fprintln(con, "SMOLVM-BOOT-ERR", err)
	}
	for _, p := range strings.Fields(string(list)) {
		f, err := os.Open(p)
		if err == nil {
			err = unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
		if err != nil && err != unix.EEXIST {
			fmt.Fprintln(con, "SMOLVM-MODULE-ERR", p, err)
		}
	}
	var names []string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		ports, _ := filepath.Glob("/sys/class/virtio-ports/*")
		names = names[:0]
		for _, p := range ports {
			n, _ := os.ReadFile(filepath.Join(p, "name"))
			names = append(names, filepath.Base(p)+"="+strings.TrimSpace(string(n)))
			if strings.TrimSpace(string(n)) != "" {
				deadline = time.Now()
			}
		}
	}
	// A 200 ms sleep wakes on the kernel's timer interrupt (the local APIC
	// timer, whose rate the tuned kernel may take from the command line);
	// the clock that measures it is the TSC. The shortest of three.
	slept := time.Hour
	for i := 0; i < 3; i++ {
		start := time.Now()
		time.Sleep(200 * time.Millisecond)
		slept = min(slept, time.Since(start))
	}
	up, _ := os.ReadFile("/proc/uptime")
	fmt.Fprintf(con, "SMOLVM-BOOT-OK uptime=%s sleep200=%d ports=%s\n", strings.Fields(string(up)+" ?")[0], slept.Milliseconds(), strings.Join(names, ","))
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
`

// buildBootInit compiles bootInitSource into a static binary.
func buildBootInit(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte(bootInitSource), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "init")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build test init: %v\n%s", err, out)
	}
	return bin
}

// testCacheDir is a cache shared between test runs so that the kernel is
// downloaded once; SMOLVM_TEST_CACHE overrides it.
func testCacheDir(t testing.TB) string {
	if d := os.Getenv("SMOLVM_TEST_CACHE"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "smolvm-image-test-cache")
}

func needBootHost(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a guest; skipped with -short")
	}
	for _, p := range CheckHost(context.Background()) {
		if !p.Optional {
			t.Skipf("host not ready: %s", p)
		}
	}
}

// bootGuest boots kernel+initrd under QEMU microvm and returns the time to
// SMOLVM-BOOT-OK and the console log.
func bootGuest(t testing.TB, kernel, initrd string, extraArgs ...string) (time.Duration, string) {
	t.Helper()
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	sock := filepath.Join(dir, "agent.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
		"-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-sandbox", "on",
		"-kernel", kernel, "-initrd", initrd,
		"-append", strings.Join(append(append([]string{"console=ttyS0", "reboot=t", "panic=-1", "quiet"}, TCGKernelArgs()...), extraArgs...), " "),
		"-serial", "file:"+logPath,
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=org.smolvm.agent",
		"-no-reboot")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		t.Logf("qemu ended: %v", <-exited)
	})
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			b, _ := os.ReadFile(logPath)
			t.Fatalf("guest did not print SMOLVM-BOOT-OK within 90s; console:\n%s", b)
		case err := <-exited:
			exited <- err
			b, _ := os.ReadFile(logPath)
			if bytes.Contains(b, []byte("SMOLVM-BOOT-OK")) {
				return time.Since(start), string(b)
			}
			t.Fatalf("qemu exited (%v) before SMOLVM-BOOT-OK; stderr: %s\nconsole:\n%s", err, stderr.String(), b)
		case <-tick.C:
			b, _ := os.ReadFile(logPath)
			if i := bytes.Index(b, []byte("SMOLVM-BOOT-OK")); i >= 0 && bytes.IndexByte(b[i:], '\n') >= 0 {
				return time.Since(start), string(b)
			}
		}
	}
}

func TestBootDefault(t *testing.T) {
	needBootHost(t)
	d, err := EnsureDefault(context.Background(), Options{
		CacheDir:  testCacheDir(t),
		AgentPath: buildBootInit(t),
		Logger:    testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s (%s), initrd %s, modules %v", d.Kernel, d.KernelVersion, d.Initrd, d.Modules)
	took, log := bootGuest(t, d.Kernel, d.Initrd)
	t.Logf("SMOLVM-BOOT-OK after %v", took.Round(time.Millisecond))
	if !strings.Contains(log, "org.smolvm.agent") {
		t.Errorf("guest did not see the virtio-serial port org.smolvm.agent; console:\n%s", log)
	}
	if strings.Contains(log, "SMOLVM-MODULE-ERR") {
		t.Errorf("guest failed to load modules; console:\n%s", log)
	}
}
