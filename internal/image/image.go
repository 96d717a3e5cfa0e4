package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// builderVersion changes whenever the layout of the cache or of the initramfs
// changes, so that old cache entries are not reused.
const builderVersion = "smolvm-image/1"

// initramfsLayout changes whenever the initramfs gains or changes a file of
// its own (2: /bin/bash), so that old initramfs images are rebuilt while the
// kernel cache, which builderVersion also keys, stays valid.
const initramfsLayout = 2

// Options configure EnsureDefault.
type Options struct {
	// CacheDir holds the kernel and initramfs caches (e.g. $SMOLVM_HOME/cache).
	CacheDir string
	// AgentPath is the static guest agent binary; it becomes /init.
	AgentPath string
	// KernelPath, when set, is used instead of the Debian cloud kernel. No
	// modules go into the initramfs then, unless ModulesDir is set too.
	KernelPath string
	// ModulesDir is the module tree (lib/modules/<version>) of KernelPath.
	ModulesDir string
	// Tuned boots the cached tuned kernel (see BuildTunedKernel) instead of
	// the Debian cloud kernel: an initramfs without modules. It fails when
	// none is cached; KernelPath wins over it.
	Tuned bool
	// BusyboxPath is the static busybox to copy; "" means /bin/busybox.
	BusyboxPath string
	// RefreshKernel asks apt again which kernel linux-image-cloud-amd64 points
	// to and fetches it when it changed. Without it a cached kernel is reused.
	RefreshKernel bool
	// Progress is where progress is drawn when it is a terminal; nil = silent.
	Progress io.Writer
	// Logger receives logs; nil means slog.Default().
	Logger *slog.Logger
}

// Default is a bootable kernel and initramfs.
type Default struct {
	Kernel        string   // path to the kernel: a PVH vmlinux or a bzImage
	Initrd        string   // path to the initramfs (uncompressed newc cpio)
	KernelVersion string   // e.g. 6.1.0-56-cloud-amd64
	Modules       []string // module names in load order, as in /etc/smolvm/modules
	// Fingerprint is a hex sha256 over everything that went into Kernel and
	// Initrd: the kernel, agent, busybox, modules and the builder version.
	Fingerprint string
}

// EnsureDefault returns the default kernel and initramfs, building and caching
// what is missing. It is idempotent and safe to call from several processes
// at once; with a warm cache it only hashes the agent and busybox binaries.
func EnsureDefault(ctx context.Context, opts Options) (*Default, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.CacheDir == "" {
		return nil, fmt.Errorf("image cache folder not set: pass Options.CacheDir")
	}
	if opts.AgentPath == "" {
		return nil, fmt.Errorf("guest agent path not set: pass Options.AgentPath")
	}
	busybox := opts.BusyboxPath
	if busybox == "" {
		busybox = DefaultBusybox
	}
	prog := newProgress(opts.Progress)
	start := time.Now()

	ks, err := kernelFor(ctx, opts, log, prog)
	if err != nil {
		return nil, err
	}
	agentSHA, err := hashFileCached(opts.CacheDir, opts.AgentPath)
	if err != nil {
		return nil, fmt.Errorf("guest agent: %w: build it first or fix Options.AgentPath", err)
	}
	busyboxSHA, err := hashFileCached(opts.CacheDir, busybox)
	if err != nil {
		return nil, fmt.Errorf("busybox: %w: run 'apt-get install busybox-static'", err)
	}
	fp := fingerprint(ks, agentSHA, busyboxSHA)
	d := &Default{Kernel: ks.Kernel, KernelVersion: ks.Version, Fingerprint: fp}
	for _, m := range ks.Modules {
		d.Modules = append(d.Modules, m.Name)
	}
	dir := filepath.Join(opts.CacheDir, "initramfs")
	d.Initrd = filepath.Join(dir, fp+".cpio")
	if _, err := os.Stat(d.Initrd); err == nil {
		log.Debug("image cache hit", "kernel", d.Kernel, "initrd", d.Initrd, "took", time.Since(start))
		return d, nil
	}

	done := prog.step("building initramfs")
	defer done()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create initramfs cache: %w", err)
	}
	if err := checkStatic(busybox); err != nil {
		return nil, err
	}
	applets, err := busyboxApplets(ctx, busybox)
	if err != nil {
		return nil, err
	}
	spec := initramfsSpec{Agent: opts.AgentPath, Busybox: busybox, Applets: applets, Modules: ks.Modules}
	tmp, err := os.CreateTemp(dir, ".tmp-*.cpio")
	if err != nil {
		return nil, fmt.Errorf("create initramfs: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := writeInitramfs(tmp, spec); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write initramfs: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("write initramfs: %w", err)
	}
	if err := os.Rename(tmp.Name(), d.Initrd); err != nil {
		return nil, fmt.Errorf("move initramfs into cache: %w", err)
	}
	log.Info("initramfs built", "path", d.Initrd, "modules", len(ks.Modules), "took", time.Since(start).Round(time.Millisecond))
	return d, nil
}

// kernelFor returns the caller's kernel or the cached Debian one.
func kernelFor(ctx context.Context, opts Options, log *slog.Logger, prog *progress) (*kernelSet, error) {
	if opts.Tuned && opts.KernelPath == "" {
		return tunedKernelSet(opts.CacheDir)
	}
	if opts.KernelPath == "" {
		root := filepath.Join(opts.CacheDir, "kernel")
		if !opts.RefreshKernel {
			if ks := currentKernel(root); ks != nil {
				return ks, nil
			}
		}
		// Slow path: serialize fetches across processes.
		if err := os.MkdirAll(root, 0o755); err != nil {
			return nil, fmt.Errorf("create kernel cache: %w", err)
		}
		unlock, err := lockFile(ctx, filepath.Join(root, ".lock"))
		if err != nil {
			return nil, err
		}
		defer unlock()
		return cachedKernel(ctx, root, opts.RefreshKernel, log, prog)
	}
	kernel, err := filepath.Abs(opts.KernelPath)
	if err != nil {
		return nil, err
	}
	ks, err := modulesFrom(opts.ModulesDir, log)
	if err != nil {
		return nil, err
	}
	ks.Kernel = kernel
	if ks.KernelSHA, err = hashFileCached(opts.CacheDir, kernel); err != nil {
		return nil, fmt.Errorf("kernel: %w: fix Options.KernelPath", err)
	}
	ks.Version = bzImageVersion(kernel)
	return ks, nil
}

func fingerprint(ks *kernelSet, agentSHA, busyboxSHA string) string {
	h := sha256.New()
	fmt.Fprintf(h, "builder %s layout %d\nkernel %s %s\nagent %s\nbusybox %s\n", builderVersion, initramfsLayout, ks.Version, ks.KernelSHA, agentSHA, busyboxSHA)
	for _, m := range ks.Modules {
		fmt.Fprintf(h, "module %s %s\n", m.Name, m.SHA256)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// lockFile takes an exclusive flock on path, waiting until ctx is done.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open cache lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for image cache lock %s: %w", path, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashes remembers file hashes in this process (see hashFileCached).
var hashes sync.Map

// hashFileCached is hashFile for files that rarely change (the kernel, the
// agent, busybox: ~32 MB that every VM's create would otherwise read and
// hash, ~10 ms). A hash is remembered, in this process and in
// cacheDir/hashes, under the file's path, size, inode, and modification
// and change times: any write to the file, or a new file in its place,
// changes the key.
func hashFileCached(cacheDir, path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	key := hashBytes(fmt.Appendf(nil, "%s\x00%d\x00%d\x00%d\x00%d\x00%d", abs, st.Size, st.Ino, st.Dev,
		st.Mtim.Nano(), st.Ctim.Nano()))
	if v, ok := hashes.Load(key); ok {
		return v.(string), nil
	}
	file := filepath.Join(cacheDir, "hashes", key)
	if b, err := os.ReadFile(file); err == nil && isHexSHA256(string(b)) {
		hashes.Store(key, string(b))
		return string(b), nil
	}
	sum, err := hashFile(path)
	if err != nil {
		return "", err
	}
	hashes.Store(key, sum)
	// Best effort: a cache that cannot be written only costs the hashing.
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err == nil {
		if tmp, err := os.CreateTemp(filepath.Dir(file), ".tmp-*"); err == nil {
			_, werr := tmp.WriteString(sum)
			if cerr := tmp.Close(); werr == nil && cerr == nil {
				_ = os.Rename(tmp.Name(), file)
			}
			_ = os.Remove(tmp.Name())
		}
	}
	return sum, nil
}

func isHexSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

func hashBytes(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// writeFileAtomic writes data to a temp file next to path and renames it.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
