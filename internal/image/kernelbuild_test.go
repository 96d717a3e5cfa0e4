package image

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestKernelConfigFragment checks the embedded fragment parses and asks for
// everything a sandbox and the guest agent need, built in.
func TestKernelConfigFragment(t *testing.T) {
	if len(KernelConfigFragment()) == 0 {
		t.Fatal("kernel.config is not embedded")
	}
	lines, err := parseConfigFragment(kernelConfigFragment)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]configLine{}
	for _, l := range lines {
		got[l.Symbol] = l
	}
	mustBeY := []string{
		"64BIT", "SMP", "PVH", "PARAVIRT", "KVM_GUEST", "ACPI", "PCI",
		"VIRTIO", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_PCI",
		"SERIAL_8250", "SERIAL_8250_CONSOLE", "VIRTIO_CONSOLE", "VIRTIO_BLK", "VIRTIO_NET",
		"VSOCKETS", "VIRTIO_VSOCKETS", "HW_RANDOM", "HW_RANDOM_VIRTIO",
		"EXT4_FS", "OVERLAY_FS", "TMPFS", "DEVTMPFS", "DEVTMPFS_MOUNT", "PROC_FS", "SYSFS",
		"UNIX98_PTYS", "TTY", "PRINTK", "CGROUPS", "NAMESPACES", "USER_NS", "PID_NS", "NET_NS", "UTS_NS",
		"SECCOMP", "SECCOMP_FILTER", "FUTEX", "EPOLL", "EVENTFD", "TIMERFD", "SIGNALFD", "INOTIFY_USER",
		"AIO", "POSIX_TIMERS", "MULTIUSER", "FILE_LOCKING", "BINFMT_SCRIPT", "BINFMT_ELF",
		"BLK_DEV_INITRD", "NO_HZ_IDLE", "HIGH_RES_TIMERS", "UNIX", "INET", "IPV6", "NETFILTER", "SHMEM",
	}
	for _, s := range mustBeY {
		c, ok := got["CONFIG_"+s]
		switch {
		case !ok:
			t.Errorf("CONFIG_%s missing from kernel.config", s)
		case c.Value != "y":
			t.Errorf("CONFIG_%s=%s, want y", s, c.Value)
		case !c.Must:
			t.Errorf("CONFIG_%s is not marked '# must': a dropped dependency would go unnoticed", s)
		}
	}
	if c := got["CONFIG_MODULES"]; c.Value != "n" {
		t.Errorf("CONFIG_MODULES=%q, want it unset: the tuned kernel has everything built in", c.Value)
	}
	for _, c := range lines {
		if c.Value == "m" {
			t.Errorf("%s=m: the tuned kernel has no modules", c.Symbol)
		}
	}
	// The rendered allconfig is plain .config syntax (no trailing comments).
	for _, l := range strings.Split(strings.TrimSpace(string(allconfig(lines))), "\n") {
		if strings.HasPrefix(l, "CONFIG_") && strings.Contains(l, "#") {
			t.Errorf("allconfig line keeps a comment: %q", l)
		}
	}
}

func TestParseConfigFragment(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []configLine
		err      string
	}{
		{name: "values", in: "CONFIG_A=y # must\nCONFIG_B=64\nCONFIG_C=\"x y\" # a comment\n# CONFIG_D is not set\n\n# text\n",
			want: []configLine{{"CONFIG_A", "y", true}, {"CONFIG_B", "64", false}, {"CONFIG_C", `"x y"`, false}, {"CONFIG_D", "n", false}}},
		{name: "duplicate", in: "CONFIG_A=y\nCONFIG_A=n\n", err: "already set on line 1"},
		{name: "garbage", in: "CONFIG_A y\n", err: "cannot parse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseConfigFragment([]byte(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestCheckConfig(t *testing.T) {
	lines := []configLine{{"CONFIG_A", "y", true}, {"CONFIG_B", "y", true}, {"CONFIG_C", "y", false}, {"CONFIG_D", "64", true}}
	dot := "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=64\n"
	if got := checkConfig(lines, []byte(dot)); !slices.Equal(got, []string{"CONFIG_B=y"}) {
		t.Fatalf("missing = %v, want [CONFIG_B=y]", got)
	}
}

func TestTunedKernelKey(t *testing.T) {
	frag := []byte("CONFIG_A=y\n")
	edits := []sourceEdit{{Name: "e", File: "f.c", After: "a\n", Insert: "b\n"}}
	k := tunedKernelKey("6.1.192-3", frag, edits)
	if k != tunedKernelKey("6.1.192-3", []byte("CONFIG_A=y\n"), slices.Clone(edits)) {
		t.Fatal("key is not deterministic")
	}
	for name, other := range map[string]string{
		"source version": tunedKernelKey("6.1.193-1", frag, edits),
		"fragment":       tunedKernelKey("6.1.192-3", []byte("CONFIG_A=n\n"), edits),
		"source edits":   tunedKernelKey("6.1.192-3", frag, []sourceEdit{{Name: "e", File: "f.c", After: "a\n", Insert: "c\n"}}),
		"no edits":       tunedKernelKey("6.1.192-3", frag, nil),
	} {
		if other == k {
			t.Errorf("key does not change with the %s", name)
		}
	}
	if len(k) != 32 || strings.Trim(k, "0123456789abcdef") != "" {
		t.Errorf("key %q is not 32 hex digits", k)
	}
}

// TestApplySourceEdits makes the real edits in a stand-in source tree: once,
// not twice on a second run (a kept work folder), and none where the code
// they anchor to is gone.
func TestApplySourceEdits(t *testing.T) {
	src := t.TempDir()
	write := func(rel, body string) string {
		p := filepath.Join(src, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, e := range kernelSourceEdits {
		write(e.File, "/* before */\n"+e.After+"/* after */\n")
	}
	for run := 1; run <= 2; run++ {
		got, err := applySourceEdits(src, kernelSourceEdits, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(kernelSourceEdits) {
			t.Errorf("run %d: made %v, want all %d edits", run, got, len(kernelSourceEdits))
		}
		for _, e := range kernelSourceEdits {
			b, _ := os.ReadFile(filepath.Join(src, e.File))
			want := "/* before */\n" + e.After + e.Insert + "/* after */\n"
			if string(b) != want {
				t.Errorf("run %d: %s is\n%s\nwant\n%s", run, e.File, b, want)
			}
		}
	}
	lapic := kernelSourceEdits[0]
	passed := slices.ContainsFunc(TCGKernelArgs(), func(a string) bool { return strings.HasPrefix(a, "smolvm.lapic_hz=") })
	if lapic.Name != "lapic_hz" || !strings.Contains(lapic.Insert, `early_param("smolvm.lapic_hz"`) || !passed {
		t.Errorf("the lapic_hz edit and the host's smolvm.lapic_hz option do not match")
	}

	p := write("arch/x86/kernel/apic/apic.c", "/* this version initialises lapic_timer_period elsewhere */\n")
	got, err := applySourceEdits(src, kernelSourceEdits[:1], testLogger(t))
	if err != nil || len(got) != 0 {
		t.Errorf("edit without its anchor: made %v, err %v; want none and no error", got, err)
	}
	if b, _ := os.ReadFile(p); !strings.HasPrefix(string(b), "/* this version") || strings.Contains(string(b), "smolvm") {
		t.Errorf("file without the anchor was changed:\n%s", b)
	}
	if _, err := applySourceEdits(t.TempDir(), kernelSourceEdits, testLogger(t)); err == nil {
		t.Error("a source tree without the file: no error")
	}
}

func TestLookupTunedKernel(t *testing.T) {
	cache := t.TempDir()
	if _, ok := TunedKernel(cache); ok {
		t.Fatal("empty cache has a tuned kernel")
	}
	root := TunedKernelDir(cache)
	write := func(key string, m tunedManifest) {
		dir := filepath.Join(root, key)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(m)
		for name, data := range map[string][]byte{manifestName: b, "vmlinux": []byte("elf")} {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(root, "current"), []byte(key+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	good := tunedManifest{Builder: tunedBuilderVersion, FragmentSHA256: hashBytes(kernelConfigFragment), Release: "6.1.0-smolvm", VmlinuxSHA256: "abc"}
	write("k1", good)
	p, ok := TunedKernel(cache)
	if !ok || p != filepath.Join(root, "k1", "vmlinux") {
		t.Fatalf("TunedKernel = %q, %v", p, ok)
	}
	ks, err := tunedKernelSet(cache)
	if err != nil || ks.Version != "6.1.0-smolvm" || ks.KernelSHA != "abc" || len(ks.Modules) != 0 {
		t.Fatalf("tunedKernelSet = %+v, %v", ks, err)
	}
	stale := good
	stale.FragmentSHA256 = "other"
	write("k2", stale)
	if _, ok := TunedKernel(cache); ok {
		t.Error("a kernel built from another fragment is used")
	}
	old := good
	old.Builder = "smolvm-kernel/0"
	write("k3", old)
	if _, ok := TunedKernel(cache); ok {
		t.Error("a kernel from another builder version is used")
	}
}

func TestKernelBuildProblems(t *testing.T) {
	saved := kernelSourceTarball
	t.Cleanup(func() { kernelSourceTarball = saved })
	kernelSourceTarball = filepath.Join(t.TempDir(), "linux-source-6.1.tar.xz")
	probs := KernelBuildProblems()
	if !slices.ContainsFunc(probs, func(p Problem) bool { return p.Package == KernelSourcePackage }) {
		t.Fatalf("problems %v do not name %s", probs, KernelSourcePackage)
	}
	err := missingBuildDeps(probs)
	if !strings.Contains(err.Error(), "apt-get install") || !strings.Contains(err.Error(), KernelSourcePackage) {
		t.Errorf("error does not say what to install: %v", err)
	}
}

func TestIsBuildStep(t *testing.T) {
	for line, want := range map[string]bool{
		"  CC      kernel/fork.o":                      true,
		"  LD      vmlinux.o":                          true,
		"  HOSTCC  scripts/kconfig/conf.o":             true,
		"  AS      arch/x86/entry/entry_64.o":          true,
		"make[1]: Entering directory":                  false,
		"Kernel: arch/x86/boot/bzImage is ready  (#1)": false,
		"  ":                   false,
		"  warning: something": false,
	} {
		if got := isBuildStep(line); got != want {
			t.Errorf("isBuildStep(%q) = %v, want %v", line, got, want)
		}
	}
}

// tunedTestCache returns a cache folder holding a tuned kernel, building one
// when SMOLVM_TEST_KERNEL_BUILD=1, or skips.
func tunedTestCache(t *testing.T) string {
	t.Helper()
	candidates := []string{testCacheDir(t), "/var/tmp/smolvm-test-cache"}
	if h := os.Getenv("SMOLVM_HOME"); h != "" {
		candidates = append(candidates, filepath.Join(h, "cache"))
	}
	candidates = append(candidates, "/var/tmp/smolvm-ci/cache")
	for _, c := range candidates {
		if _, ok := TunedKernel(c); ok {
			return c
		}
	}
	if os.Getenv("SMOLVM_TEST_KERNEL_BUILD") != "1" {
		t.Skip("no tuned kernel cached and SMOLVM_TEST_KERNEL_BUILD=1 not set: a full kernel build is too slow for every test run")
	}
	if probs := KernelBuildProblems(); len(probs) > 0 {
		t.Skipf("cannot build the tuned kernel here: %v", missingBuildDeps(probs))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Minute)
	defer cancel()
	start := time.Now()
	if _, err := BuildTunedKernel(ctx, KernelBuildOptions{CacheDir: testCacheDir(t), Logger: testLogger(t)}); err != nil {
		t.Fatal(err)
	}
	t.Logf("tuned kernel built in %v", time.Since(start).Round(time.Second))
	return testCacheDir(t)
}

// TestBootTunedKernel boots the tuned vmlinux through PVH with an initramfs
// without modules and checks the built-in virtio console found its port.
func TestBootTunedKernel(t *testing.T) {
	needBootHost(t)
	cache := tunedTestCache(t)
	d, err := EnsureDefault(context.Background(), Options{
		CacheDir: cache, AgentPath: buildBootInit(t), Tuned: true, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Modules) != 0 {
		t.Errorf("initramfs of the tuned kernel lists modules %v", d.Modules)
	}
	if !strings.HasSuffix(d.KernelVersion, TunedKernelRelease) {
		t.Errorf("kernel version %q does not end with %s", d.KernelVersion, TunedKernelRelease)
	}
	// apic=verbose: the kernel says whether it calibrated its APIC timer.
	took, log := bootGuest(t, d.Kernel, d.Initrd, "apic=verbose", "loglevel=7")
	t.Logf("tuned kernel %s: SMOLVM-BOOT-OK after %v", d.KernelVersion, took.Round(time.Millisecond))
	// A timer interrupt rate the kernel has wrong makes sleeps end late
	// (or early, where the kernel re-arms): 200 ms must stay about 200 ms. (A
	// rate four times too high measured 473–546 ms here.)
	if m := regexp.MustCompile(`sleep200=(\d+)`).FindStringSubmatch(log); m == nil {
		t.Errorf("guest did not report its sleep; console:\n%s", log)
	} else if ms, _ := strconv.Atoi(m[1]); ms < 195 || ms > 350 {
		t.Errorf("a 200 ms sleep in the guest took %d ms (the shortest of three): its timer runs at the wrong rate", ms)
	}
	if ti, _ := LookupTunedKernel(cache); ti != nil && slices.Contains(ti.SourceEdits, "lapic_hz") {
		if !strings.Contains(log, "lapic timer already calibrated 4000000") || strings.Contains(log, "calibrating APIC timer") {
			t.Errorf("the kernel built with the lapic_hz edit calibrated its APIC timer (or not to 1 GHz / HZ 250); console:\n%s", log)
		}
	} else {
		t.Logf("the cached tuned kernel predates the lapic_hz edit (run 'smolvm kernel build')")
	}
	if !strings.Contains(log, "org.smolvm.agent") {
		t.Errorf("guest did not see the virtio-serial port org.smolvm.agent; console:\n%s", log)
	}
	if strings.Contains(log, "SMOLVM-MODULE-ERR") || strings.Contains(log, "SMOLVM-BOOT-ERR") {
		t.Errorf("guest init reported errors; console:\n%s", log)
	}
}

// A cached kernel's manifest names the source edits it was built with; the
// ones this smolvm makes and it lacks are reported (kernel info).
func TestMissingEdits(t *testing.T) {
	var all []string
	for _, e := range kernelSourceEdits {
		all = append(all, e.Name)
	}
	old := &TunedKernelInfo{}
	if got := old.MissingEdits(); !slices.Equal(got, all) {
		t.Errorf("kernel built without edits: missing %v, want %v", got, all)
	}
	current := &TunedKernelInfo{tunedManifest: tunedManifest{SourceEdits: all}}
	if got := current.MissingEdits(); len(got) != 0 {
		t.Errorf("kernel built with every edit: missing %v", got)
	}
}
