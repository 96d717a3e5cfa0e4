package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
)

// The tuned kernel: Debian's kernel source (linux-source-6.1) configured
// with `make allnoconfig` plus the project's fragment (kernel.config), with
// everything a sandbox needs built in and no modules. Its uncompressed
// vmlinux boots through PVH (QEMU's -kernel loads an ELF with a PVH note
// directly), which skips the bzImage's decompression and real-mode setup.
//
// Cache layout, under CacheDir/kernel-tuned:
//
//	<key>/vmlinux        the ELF kernel that is booted
//	<key>/bzImage        the same kernel as a bzImage (for loaders without PVH)
//	<key>/config         the final .config
//	<key>/manifest.json  what went in (see tunedManifest)
//	current              the <key> of the latest build
//
// key = sha256(builder version, source package version, fragment, source
// edits).

// KernelSourcePackage is the Debian package with the tuned kernel's source.
const KernelSourcePackage = "linux-source-6.1"

// kernelSourceTarball is where KernelSourcePackage puts the source.
var kernelSourceTarball = "/usr/src/linux-source-6.1.tar.xz"

// tunedBuilderVersion changes whenever the build recipe changes in a way the
// fragment does not show (make targets, layout of the cache entry).
const tunedBuilderVersion = "smolvm-kernel/1"

// TunedKernelRelease is the LOCALVERSION of the tuned kernel (uname -r ends
// with it).
const TunedKernelRelease = "-smolvm"

//go:embed kernel.config
var kernelConfigFragment []byte

// sourceEdit is a change smolvm makes to the kernel source before building
// it: Insert goes right after the first occurrence of After in File.
type sourceEdit struct {
	Name, File, After, Insert string
}

// kernelSourceEdits are all of smolvm's changes to Debian's kernel source.
//
// lapic_hz: at boot the kernel measures its local APIC timer against the
// tick for 100 ms (LAPIC_CAL_LOOPS), unless the CPU has a TSC-deadline timer
// (KVM's does, TCG's does not) or platform code knows the rate. QEMU's APIC
// runs at a fixed 1 GHz, so the host says so (LAPICTimerHz, passed under
// TCG) and the boot is 100 ms shorter.
var kernelSourceEdits = []sourceEdit{{
	Name:  "lapic_hz",
	File:  "arch/x86/kernel/apic/apic.c",
	After: "unsigned int lapic_timer_period = 0;\n",
	Insert: `
/* smolvm: smolvm.lapic_hz=RATE sets the APIC timer rate and skips its calibration. */
static int __init smolvm_lapic_hz(char *arg)
{
	unsigned long hz;

	if (!arg || kstrtoul(arg, 0, &hz) || hz < HZ)
		return -EINVAL;
	lapic_timer_period = hz / HZ;
	return 0;
}
early_param("smolvm.lapic_hz", smolvm_lapic_hz);
`,
}}

// applySourceEdits makes kernelSourceEdits in the source tree src and
// returns the names of those it holds. An edit already made (a kept work
// folder) is not made twice. An edit whose anchor is missing (a source
// version that changed the code) is skipped with a warning: the kernel it
// builds works, it only does the work the edit would have saved.
func applySourceEdits(src string, edits []sourceEdit, log *slog.Logger) ([]string, error) {
	var done []string
	for _, e := range edits {
		p := filepath.Join(src, e.File)
		b, err := os.ReadFile(p)
		if err != nil {
			return done, fmt.Errorf("kernel source edit %s: %w", e.Name, err)
		}
		if bytes.Contains(b, []byte(e.After+e.Insert)) {
			done = append(done, e.Name)
			continue
		}
		i := bytes.Index(b, []byte(e.After))
		if i < 0 {
			log.Warn("kernel source edit skipped: its anchor is not in this source version", "edit", e.Name, "file", e.File)
			continue
		}
		b = slices.Insert(b, i+len(e.After), []byte(e.Insert)...)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return done, fmt.Errorf("kernel source edit %s: %w", e.Name, err)
		}
		done = append(done, e.Name)
	}
	return done, nil
}

// MissingEdits returns the source edits of this smolvm that ti was built
// without (by name): 'smolvm kernel build' makes a kernel that has them.
func (ti *TunedKernelInfo) MissingEdits() []string {
	var missing []string
	for _, e := range kernelSourceEdits {
		if !slices.Contains(ti.SourceEdits, e.Name) {
			missing = append(missing, e.Name)
		}
	}
	return missing
}

// sourceEditsHash identifies a list of source edits, for the cache key.
func sourceEditsHash(edits []sourceEdit) string {
	h := sha256.New()
	for _, e := range edits {
		fmt.Fprintf(h, "%s\x00%s\x00%s\x00%s\x00", e.Name, e.File, e.After, e.Insert)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// KernelConfigFragment returns the embedded config fragment.
func KernelConfigFragment() []byte { return bytes.Clone(kernelConfigFragment) }

// configLine is one assignment of the fragment.
type configLine struct {
	Symbol string // e.g. CONFIG_VIRTIO_MMIO
	Value  string // "y", "n" (for "# ... is not set"), a number or a quoted string
	Must   bool   // marked "# must": checked in the final .config
}

var (
	configSet   = regexp.MustCompile(`^(CONFIG_[A-Za-z0-9_]+)=("[^"]*"|[^\s#]+)\s*(#.*)?$`)
	configUnset = regexp.MustCompile(`^# (CONFIG_[A-Za-z0-9_]+) is not set$`)
)

// parseConfigFragment reads a Kconfig fragment. Besides the .config syntax it
// allows comments after a value; "# must" after a value marks a symbol that
// must come out of Kconfig with that value.
func parseConfigFragment(b []byte) ([]configLine, error) {
	var out []configLine
	seen := map[string]int{}
	for i, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		var c configLine
		if m := configSet.FindStringSubmatch(l); m != nil {
			c = configLine{Symbol: m[1], Value: m[2], Must: strings.TrimSpace(m[3]) == "# must"}
		} else if m := configUnset.FindStringSubmatch(l); m != nil {
			c = configLine{Symbol: m[1], Value: "n"}
		} else if l == "" || strings.HasPrefix(l, "#") {
			continue
		} else {
			return nil, fmt.Errorf("kernel config fragment line %d: cannot parse %q", i+1, l)
		}
		if prev, dup := seen[c.Symbol]; dup {
			return nil, fmt.Errorf("kernel config fragment line %d: %s already set on line %d", i+1, c.Symbol, prev)
		}
		seen[c.Symbol] = i + 1
		out = append(out, c)
	}
	return out, nil
}

// allconfig renders the fragment in plain .config syntax for KCONFIG_ALLCONFIG.
func allconfig(lines []configLine) []byte {
	var b bytes.Buffer
	for _, c := range lines {
		if c.Value == "n" {
			fmt.Fprintf(&b, "# %s is not set\n", c.Symbol)
		} else {
			fmt.Fprintf(&b, "%s=%s\n", c.Symbol, c.Value)
		}
	}
	return b.Bytes()
}

// checkConfig returns the "# must" symbols the final .config lacks.
func checkConfig(lines []configLine, dotConfig []byte) []string {
	got := map[string]string{}
	for _, l := range strings.Split(string(dotConfig), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			got[k] = v
		}
	}
	var missing []string
	for _, c := range lines {
		if c.Must && got[c.Symbol] != c.Value {
			missing = append(missing, c.Symbol+"="+c.Value)
		}
	}
	return missing
}

// tunedKernelKey is the cache key of a tuned kernel.
func tunedKernelKey(sourceVersion string, fragment []byte, edits []sourceEdit) string {
	h := sha256.New()
	fmt.Fprintf(h, "builder %s\nsource %s %s\nfragment %s\n", tunedBuilderVersion, KernelSourcePackage, sourceVersion, hashBytes(fragment))
	if len(edits) > 0 {
		fmt.Fprintf(h, "edits %s\n", sourceEditsHash(edits))
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// tunedManifest describes a cache entry.
type tunedManifest struct {
	Builder        string    `json:"builder"`
	SourcePackage  string    `json:"source_package"`
	SourceVersion  string    `json:"source_version"`
	FragmentSHA256 string    `json:"fragment_sha256"`
	Release        string    `json:"release"` // uname -r of the kernel
	VmlinuxSHA256  string    `json:"vmlinux_sha256"`
	BzImageSHA256  string    `json:"bzimage_sha256,omitempty"`
	Built          time.Time `json:"built"`
	BuildSeconds   float64   `json:"build_seconds"`
	Jobs           int       `json:"jobs"`
	BuildSteps     int       `json:"build_steps"`            // lines of make output, for the next progress bar
	SourceEdits    []string  `json:"source_edits,omitempty"` // kernelSourceEdits made (by name)
}

// TunedKernelDir is the cache folder of tuned kernels under cacheDir.
func TunedKernelDir(cacheDir string) string { return filepath.Join(cacheDir, "kernel-tuned") }

// TunedKernelInfo is a cached tuned kernel.
type TunedKernelInfo struct {
	Vmlinux string // ELF kernel, booted through PVH
	BzImage string // same kernel as a bzImage ("" when absent)
	Dir     string
	tunedManifest
}

// LookupTunedKernel returns the tuned kernel the last build left in the cache
// (CacheDir/kernel-tuned/current), provided it was built from the config
// fragment and recipe of this binary. It does not ask dpkg which source
// version is installed, so it is cheap enough for every VM create; a newer
// source package is picked up by the next BuildTunedKernel.
func LookupTunedKernel(cacheDir string) (*TunedKernelInfo, bool) {
	root := TunedKernelDir(cacheDir)
	cur, err := os.ReadFile(filepath.Join(root, "current"))
	if err != nil {
		return nil, false
	}
	return loadTunedKernel(filepath.Join(root, strings.TrimSpace(string(cur))))
}

func loadTunedKernel(dir string) (*TunedKernelInfo, bool) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, false
	}
	ti := &TunedKernelInfo{Dir: dir, Vmlinux: filepath.Join(dir, "vmlinux")}
	if json.Unmarshal(b, &ti.tunedManifest) != nil || ti.Builder != tunedBuilderVersion || ti.FragmentSHA256 != hashBytes(kernelConfigFragment) {
		return nil, false
	}
	if _, err := os.Stat(ti.Vmlinux); err != nil {
		return nil, false
	}
	if bz := filepath.Join(dir, "bzImage"); fileExists(bz) {
		ti.BzImage = bz
	}
	return ti, true
}

// TunedKernel returns the path of the cached tuned vmlinux, if any.
func TunedKernel(cacheDir string) (path string, ok bool) {
	ti, ok := LookupTunedKernel(cacheDir)
	if !ok {
		return "", false
	}
	return ti.Vmlinux, true
}

// tunedKernelSet is the kernelSet of the cached tuned kernel: no modules,
// version and hash from its manifest (no hashing of the vmlinux per create).
func tunedKernelSet(cacheDir string) (*kernelSet, error) {
	ti, ok := LookupTunedKernel(cacheDir)
	if !ok {
		return nil, fmt.Errorf("no tuned kernel in %s: run 'smolvm kernel build'", TunedKernelDir(cacheDir))
	}
	ks, err := modulesFrom("", nil)
	if err != nil {
		return nil, err
	}
	ks.Kernel, ks.KernelSHA, ks.Version = ti.Vmlinux, ti.VmlinuxSHA256, ti.Release
	return ks, nil
}

// KernelBuildOptions configure BuildTunedKernel.
type KernelBuildOptions struct {
	// CacheDir holds the kernel caches (e.g. $SMOLVM_HOME/cache).
	CacheDir string
	// Jobs is make's -j; 0 means the number of CPUs.
	Jobs int
	// Force rebuilds even when the kernel for this key is cached.
	Force bool
	// InstallPackages installs missing build dependencies with apt-get
	// (root only); otherwise they are reported in the error.
	InstallPackages bool
	// WorkDir is where the source is unpacked and built; "" means a
	// temporary folder inside the cache (removed afterwards).
	WorkDir string
	// Progress is where progress is drawn when it is a terminal; nil = silent.
	Progress io.Writer
	// Output, when set, receives make's output as it comes.
	Output io.Writer
	// Logger receives logs; nil means slog.Default().
	Logger *slog.Logger
}

// buildTools are what a tuned kernel build needs besides the source, with
// the Debian package of each. Tools are looked up in PATH; entries starting
// with "/" are files (headers).
var buildTools = []struct{ need, pkg string }{
	{"make", "make"},
	{"gcc", "gcc"},
	{"ld", "binutils"},
	{"bc", "bc"},
	{"bison", "bison"},
	{"flex", "flex"},
	{"perl", "perl"},
	{"tar", "tar"},
	{"xz", "xz-utils"},
	{"/usr/include/libelf.h", "libelf-dev"}, // objtool
}

// KernelBuildProblems reports what the host lacks to build the tuned kernel.
func KernelBuildProblems() []Problem {
	var probs []Problem
	for _, t := range buildTools {
		if strings.HasPrefix(t.need, "/") {
			if !fileExists(t.need) {
				probs = append(probs, Problem{Missing: t.need, Package: t.pkg, Detail: "not found; the kernel build needs it"})
			}
		} else if _, err := lookPath(t.need); err != nil {
			probs = append(probs, Problem{Missing: t.need, Package: t.pkg, Detail: "not found; the kernel build needs it"})
		}
	}
	if !fileExists(kernelSourceTarball) {
		probs = append(probs, Problem{Missing: kernelSourceTarball, Package: KernelSourcePackage, Detail: "not found; it is the kernel source"})
	}
	return probs
}

// kernelSourceVersion is the installed version of KernelSourcePackage.
func kernelSourceVersion(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Version}", KernelSourcePackage).Output()
	v := strings.TrimSpace(string(out))
	if err != nil || v == "" {
		// Not installed through dpkg (or no dpkg): key on the tarball.
		fi, serr := os.Stat(kernelSourceTarball)
		if serr != nil {
			return "", fmt.Errorf("%s is not installed: run 'apt-get install %s'", KernelSourcePackage, KernelSourcePackage)
		}
		return fmt.Sprintf("file-%d-%d", fi.Size(), fi.ModTime().Unix()), nil
	}
	return v, nil
}

// BuildTunedKernel builds the tuned kernel unless it is cached for the
// installed source version and the embedded fragment, and returns the path
// of its vmlinux. Builds are serialized across processes.
func BuildTunedKernel(ctx context.Context, opts KernelBuildOptions) (string, error) {
	ti, err := EnsureTunedKernel(ctx, opts)
	if err != nil {
		return "", err
	}
	return ti.Vmlinux, nil
}

// EnsureTunedKernel is BuildTunedKernel returning the whole cache entry.
func EnsureTunedKernel(ctx context.Context, opts KernelBuildOptions) (*TunedKernelInfo, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.CacheDir == "" {
		return nil, errors.New("kernel cache folder not set: pass KernelBuildOptions.CacheDir")
	}
	if probs := KernelBuildProblems(); len(probs) > 0 {
		if !opts.InstallPackages {
			return nil, missingBuildDeps(probs)
		}
		if err := installBuildDeps(ctx, probs, opts.Output, log); err != nil {
			return nil, err
		}
	}
	version, err := kernelSourceVersion(ctx)
	if err != nil {
		return nil, err
	}
	key := tunedKernelKey(version, kernelConfigFragment, kernelSourceEdits)
	root := TunedKernelDir(opts.CacheDir)
	dir := filepath.Join(root, key)
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel cache: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(root, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if ti, ok := loadTunedKernel(dir); ok && !opts.Force {
		log.Debug("tuned kernel cache hit", "dir", dir)
		return ti, setCurrentTuned(root, key)
	}
	ti, err := buildTuned(ctx, opts, log, root, key, version)
	if err != nil {
		return nil, err
	}
	if err := setCurrentTuned(root, key); err != nil {
		return nil, err
	}
	return ti, nil
}

// setCurrentTuned points root/current at key, readable by everyone.
func setCurrentTuned(root, key string) error {
	cur := filepath.Join(root, "current")
	if err := writeFileAtomic(cur, []byte(key+"\n")); err != nil {
		return err
	}
	return os.Chmod(cur, 0o644)
}

func missingBuildDeps(probs []Problem) error {
	pkgs := missingPackages(probs)
	return fmt.Errorf("cannot build the tuned kernel, the host is missing %s: run 'apt-get install --no-install-recommends %s' (as root, 'smolvm kernel build' without --no-install does it); Debian's stock kernel keeps working meanwhile",
		describeProblems(probs), strings.Join(pkgs, " "))
}

func describeProblems(probs []Problem) string {
	var s []string
	for _, p := range probs {
		s = append(s, fmt.Sprintf("%s (package %s)", p.Missing, p.Package))
	}
	return strings.Join(s, ", ")
}

func installBuildDeps(ctx context.Context, probs []Problem, out io.Writer, log *slog.Logger) error {
	if out == nil {
		out = io.Discard
	}
	pkgs := missingPackages(probs)
	if _, err := lookPath("apt-get"); err != nil || os.Geteuid() != 0 {
		return missingBuildDeps(probs)
	}
	log.Info("installing kernel build dependencies", "packages", pkgs)
	args := append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)
	err := runApt(ctx, out, args...)
	if err != nil && errors.Is(err, errUnknownPackage) {
		if uerr := runApt(ctx, out, "update"); uerr != nil {
			return fmt.Errorf("apt-get update: %w", uerr)
		}
		err = runApt(ctx, out, args...)
	}
	if err != nil {
		return fmt.Errorf("apt-get install %s: %w", strings.Join(pkgs, " "), err)
	}
	if left := KernelBuildProblems(); len(left) > 0 {
		return missingBuildDeps(left)
	}
	return nil
}

// defaultBuildSteps is roughly how many lines make prints for a build
// (measured); the progress bar uses the count of the last build when known.
const defaultBuildSteps = 1900

func buildTuned(ctx context.Context, opts KernelBuildOptions, log *slog.Logger, root, key, version string) (*TunedKernelInfo, error) {
	start := time.Now()
	frag, err := parseConfigFragment(kernelConfigFragment)
	if err != nil {
		return nil, err
	}
	jobs := opts.Jobs
	if jobs <= 0 {
		jobs = runtime.NumCPU()
	}
	work := opts.WorkDir
	if work == "" {
		if work, err = os.MkdirTemp(root, ".build-"); err != nil {
			return nil, fmt.Errorf("create kernel build folder: %w", err)
		}
		defer os.RemoveAll(work)
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel build folder: %w", err)
	}
	prog := newProgress(opts.Progress)
	out := opts.Output
	if out == nil {
		out = io.Discard
	}

	src := filepath.Join(work, strings.TrimSuffix(filepath.Base(kernelSourceTarball), ".tar.xz"))
	stamp := filepath.Join(work, ".smolvm-source-version")
	fresh := true
	if b, _ := os.ReadFile(stamp); opts.WorkDir != "" && string(b) == version && fileExists(filepath.Join(src, "Makefile")) {
		fresh = false
		// A kept work folder with this source: make rebuilds what changed.
		log.Info("reusing unpacked kernel source", "dir", src)
	} else {
		_ = os.RemoveAll(src)
		done := prog.step("unpacking " + KernelSourcePackage + " " + version)
		log.Info("unpacking kernel source", "tarball", kernelSourceTarball, "into", work)
		o, err := exec.CommandContext(ctx, "tar", "-xf", kernelSourceTarball, "-C", work).CombinedOutput()
		done()
		if err != nil {
			return nil, fmt.Errorf("unpack %s: %w: %s", kernelSourceTarball, err, tail(o))
		}
		if err := os.WriteFile(stamp, []byte(version), 0o644); err != nil {
			return nil, err
		}
	}
	if !fileExists(filepath.Join(src, "Makefile")) {
		return nil, fmt.Errorf("%s did not unpack into %s", kernelSourceTarball, src)
	}
	edits, err := applySourceEdits(src, kernelSourceEdits, log)
	if err != nil {
		return nil, err
	}

	allcfg := filepath.Join(work, "smolvm.config")
	if err := os.WriteFile(allcfg, allconfig(frag), 0o644); err != nil {
		return nil, err
	}
	makeArgs := []string{"-C", src, "ARCH=x86_64", "KBUILD_BUILD_USER=smolvm", "KBUILD_BUILD_HOST=smolvm"}
	if o, err := runMake(ctx, src, append(makeArgs, "KCONFIG_ALLCONFIG="+allcfg, "allnoconfig"), out, nil); err != nil {
		return nil, fmt.Errorf("configure kernel (make allnoconfig): %w: %s", err, tail(o))
	}
	dot, err := os.ReadFile(filepath.Join(src, ".config"))
	if err != nil {
		return nil, fmt.Errorf("kernel configuration: %w", err)
	}
	if missing := checkConfig(frag, dot); len(missing) > 0 {
		return nil, fmt.Errorf("kernel config fragment: Kconfig dropped %s (a dependency is missing from internal/image/kernel.config)", strings.Join(missing, ", "))
	}

	total := defaultBuildSteps
	if prev, ok := LookupTunedKernel(opts.CacheDir); ok && prev.BuildSteps > 0 {
		total = prev.BuildSteps
	}
	bar := prog.bar(total, fmt.Sprintf("building kernel (make -j%d)", jobs))
	log.Info("building kernel", "source", version, "jobs", jobs)
	steps := 0
	o, err := runMake(ctx, src, append(makeArgs, "-j"+strconv.Itoa(jobs), "vmlinux", "bzImage"), out, func(line string) {
		if isBuildStep(line) {
			steps++
			bar.add()
		}
	})
	bar.finish()
	if err != nil {
		return nil, fmt.Errorf("build kernel (make vmlinux bzImage): %w: %s", err, tail(o))
	}

	tmp, err := os.MkdirTemp(root, ".tmp-"+key+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, err
	}
	for _, f := range []struct{ from, to string }{
		{"vmlinux", "vmlinux"}, {"arch/x86/boot/bzImage", "bzImage"}, {".config", "config"},
	} {
		if err := copyFile(filepath.Join(src, f.from), filepath.Join(tmp, f.to)); err != nil {
			return nil, fmt.Errorf("kernel build left no %s: %w", f.from, err)
		}
	}
	if !fresh {
		// An incremental build says nothing about the size of a full one.
		steps = max(total, defaultBuildSteps)
	}
	rel, _ := os.ReadFile(filepath.Join(src, "include", "config", "kernel.release"))
	m := tunedManifest{
		Builder: tunedBuilderVersion, SourcePackage: KernelSourcePackage, SourceVersion: version,
		FragmentSHA256: hashBytes(kernelConfigFragment), Release: strings.TrimSpace(string(rel)),
		Built: time.Now().UTC(), BuildSeconds: time.Since(start).Round(time.Second).Seconds(), Jobs: jobs, BuildSteps: steps,
		SourceEdits: edits,
	}
	if m.VmlinuxSHA256, err = hashFile(filepath.Join(tmp, "vmlinux")); err != nil {
		return nil, err
	}
	if m.BzImageSHA256, err = hashFile(filepath.Join(tmp, "bzImage")); err != nil {
		return nil, err
	}
	mf, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, manifestName), mf, 0o644); err != nil {
		return nil, fmt.Errorf("write kernel manifest: %w", err)
	}
	dir := filepath.Join(root, key)
	if fileExists(dir) {
		// A forced rebuild: move the old entry aside first.
		old := dir + ".old"
		_ = os.RemoveAll(old)
		if err := os.Rename(dir, old); err != nil {
			return nil, fmt.Errorf("replace cached kernel: %w", err)
		}
		defer os.RemoveAll(old)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("move kernel into cache: %w", err)
	}
	ti, ok := loadTunedKernel(dir)
	if !ok {
		return nil, fmt.Errorf("kernel cache %s unreadable right after writing it", dir)
	}
	log.Info("tuned kernel built", "release", m.Release, "dir", dir, "took", time.Since(start).Round(time.Second))
	return ti, nil
}

// isBuildStep reports whether a line of kbuild's short output is one step
// ("  CC      kernel/fork.o").
func isBuildStep(line string) bool {
	if !strings.HasPrefix(line, "  ") || len(line) < 4 {
		return false
	}
	f := strings.Fields(line)
	if len(f) < 2 {
		return false
	}
	for _, r := range f[0] {
		if (r < 'A' || r > 'Z') && r != '_' && (r < '0' || r > '9') && r != '-' {
			return false
		}
	}
	return true
}

// runMake runs make, copying its output to out, calling onLine for each
// line, and returns the output's tail for errors. Make and its children
// run in their own process group, killed as a whole on cancel.
func runMake(ctx context.Context, dir string, args []string, out io.Writer, onLine func(string)) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "make", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	ring := &tailBuffer{max: 16 << 10}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			_, _ = ring.Write([]byte(line + "\n")) // a tailBuffer never fails
			fmt.Fprintln(out, line)
			if onLine != nil {
				onLine(line)
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	err := cmd.Start()
	if err == nil {
		err = cmd.Wait()
	}
	pw.Close()
	wg.Wait()
	if errors.Is(err, exec.ErrNotFound) {
		return nil, fmt.Errorf("make not found: run 'apt-get install make'")
	}
	if err != nil && ctx.Err() != nil {
		return ring.Bytes(), fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return ring.Bytes(), err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return bytes.Clone(t.b)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// countBar is a determinate progress bar; the zero value is silent.
type countBar struct {
	bar *progressbar.ProgressBar
	max int
	n   int
}

func (b *countBar) add() {
	if b == nil || b.bar == nil {
		return
	}
	b.n++
	if b.n >= b.max {
		// The estimate was low: grow the bar rather than stall at 100%.
		b.max = b.n + b.n/10
		b.bar.ChangeMax(b.max)
	}
	_ = b.bar.Add(1)
}

func (b *countBar) finish() {
	if b == nil || b.bar == nil {
		return
	}
	_ = b.bar.Finish()
}

// bar shows a bar of total steps on a terminal.
func (p *progress) bar(total int, desc string) *countBar {
	if p == nil || p.w == nil {
		return &countBar{}
	}
	return &countBar{max: total, bar: progressbar.NewOptions(total,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowCount(),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionClearOnFinish(),
	)}
}
