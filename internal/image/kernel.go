package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// KernelMetaPackage is the Debian package whose dependency names the kernel.
const KernelMetaPackage = "linux-image-cloud-amd64"

// kernelSet is a kernel with its ordered modules.
type kernelSet struct {
	Version   string      `json:"version"`
	Package   string      `json:"package,omitempty"`
	Kernel    string      `json:"-"` // absolute path of the kernel to boot (bzImage or PVH vmlinux)
	KernelSHA string      `json:"kernel_sha256"`
	Modules   []kernelMod `json:"modules"` // load order
	Wanted    []string    `json:"wanted"`
	Builder   string      `json:"builder"`
}

type kernelMod struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
	path   string // file holding the decompressed module, when on disk
	data   []byte // decompressed content, when not on disk
}

func (m kernelMod) content() ([]byte, error) {
	if m.data != nil {
		return m.data, nil
	}
	b, err := os.ReadFile(m.path)
	if err != nil {
		return nil, fmt.Errorf("read cached module %s: %w", m.Name, err)
	}
	return b, nil
}

const manifestName = "manifest.json"

// loadCachedKernel reads CacheDir/kernel/<version>/manifest.json. It returns
// nil when the cache entry is absent or was made for other wanted modules or
// an older builder.
func loadCachedKernel(dir string) *kernelSet {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil
	}
	var ks kernelSet
	if json.Unmarshal(b, &ks) != nil || ks.Builder != builderVersion || !slices.Equal(ks.Wanted, DefaultModules) {
		return nil
	}
	for i := range ks.Modules {
		ks.Modules[i].path = filepath.Join(dir, "modules", ks.Modules[i].Name+".ko")
	}
	if _, err := os.Stat(filepath.Join(dir, "vmlinuz")); err != nil {
		return nil
	}
	ks.Kernel = bootKernel(dir) // vmlinux.go
	return &ks
}

// cachedKernel returns the kernel from the cache, fetching it first when the
// cache is cold or refresh is set.
func cachedKernel(ctx context.Context, root string, refresh bool, log *slog.Logger, prog *progress) (*kernelSet, error) {
	if !refresh {
		if ks := currentKernel(root); ks != nil {
			return ks, nil
		}
	}
	pkg, err := resolveKernelPackage(ctx, log)
	if err != nil {
		return nil, err
	}
	version := strings.TrimPrefix(pkg, "linux-image-")
	dir := filepath.Join(root, version)
	ks := loadCachedKernel(dir)
	if ks == nil {
		if ks, err = fetchKernel(ctx, root, pkg, version, log, prog); err != nil {
			return nil, err
		}
	}
	if err := writeFileAtomic(filepath.Join(root, "current"), []byte(version+"\n")); err != nil {
		return nil, err
	}
	return ks, nil
}

// currentKernel returns the kernel root/current points to, or nil.
func currentKernel(root string) *kernelSet {
	v, err := os.ReadFile(filepath.Join(root, "current"))
	if err != nil {
		return nil
	}
	return loadCachedKernel(filepath.Join(root, strings.TrimSpace(string(v))))
}

// resolveKernelPackage asks apt which versioned package the meta package
// depends on, running apt-get update once when apt does not know it.
func resolveKernelPackage(ctx context.Context, log *slog.Logger) (string, error) {
	for attempt := 0; ; attempt++ {
		out, err := exec.CommandContext(ctx, "apt-cache", "depends", KernelMetaPackage).CombinedOutput()
		if err == nil {
			for _, l := range strings.Split(string(out), "\n") {
				l = strings.TrimSpace(l)
				if dep, ok := strings.CutPrefix(l, "Depends:"); ok {
					dep = strings.TrimSpace(dep)
					if strings.HasPrefix(dep, "linux-image-") && !strings.HasPrefix(dep, "<") {
						log.Debug("resolved kernel package", "meta", KernelMetaPackage, "package", dep)
						return dep, nil
					}
				}
			}
		}
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("apt-cache not found: fetching the default kernel needs a Debian host with apt, or set a kernel path: %w", err)
		}
		if attempt > 0 {
			return "", fmt.Errorf("cannot resolve %s with apt-cache (%s): run 'apt-get update' or set a kernel path", KernelMetaPackage, strings.TrimSpace(string(out)))
		}
		if err := aptUpdate(ctx, log); err != nil {
			return "", err
		}
	}
}

func aptUpdate(ctx context.Context, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("apt does not know %s: run 'sudo apt-get update' and retry", KernelMetaPackage)
	}
	log.Info("running apt-get update")
	out, err := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput()
	if err != nil {
		return fmt.Errorf("apt-get update failed: %w: %s", err, tail(out))
	}
	return nil
}

// fetchKernel downloads and unpacks pkg, keeps the bzImage and the needed
// modules and renames the result into root/version.
func fetchKernel(ctx context.Context, root, pkg, version string, log *slog.Logger, prog *progress) (*kernelSet, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("create kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(root, ".tmp-"+version+"-")
	if err != nil {
		return nil, fmt.Errorf("create kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)

	done := prog.step("downloading " + pkg)
	log.Info("downloading kernel", "package", pkg)
	dl := filepath.Join(tmp, "dl")
	if err := os.Mkdir(dl, 0o755); err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
		cmd.Dir = dl
		out, err := cmd.CombinedOutput()
		if err == nil {
			break
		}
		if errors.Is(err, exec.ErrNotFound) {
			done()
			return nil, fmt.Errorf("apt-get not found: install apt or set a kernel path: %w", err)
		}
		unknown := bytes.Contains(out, []byte("Unable to locate")) || bytes.Contains(out, []byte("has no installation candidate"))
		if attempt > 0 || !unknown {
			done()
			return nil, fmt.Errorf("apt-get download %s: %w: %s", pkg, err, tail(out))
		}
		if err := aptUpdate(ctx, log); err != nil {
			done()
			return nil, err
		}
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		done()
		return nil, fmt.Errorf("apt-get download %s left %d .deb files, want 1", pkg, len(debs))
	}
	done = prog.switchTo(done, "unpacking "+pkg)
	x := filepath.Join(tmp, "x")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], x).CombinedOutput(); err != nil {
		done()
		return nil, fmt.Errorf("dpkg-deb -x %s: %w: %s (is dpkg installed?)", filepath.Base(debs[0]), err, tail(out))
	}
	defer done()

	out := filepath.Join(tmp, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return nil, err
	}
	if err := copyFile(filepath.Join(x, "boot", "vmlinuz-"+version), filepath.Join(out, "vmlinuz")); err != nil {
		return nil, fmt.Errorf("kernel package %s has no /boot/vmlinuz-%s: %w", pkg, version, err)
	}
	_ = copyFile(filepath.Join(x, "boot", "config-"+version), filepath.Join(out, "config"))
	modDir := filepath.Join(x, "lib", "modules", version)
	if _, err := os.Stat(modDir); err != nil {
		modDir = filepath.Join(x, "usr", "lib", "modules", version)
	}
	ks, err := modulesFrom(modDir, log)
	if err != nil {
		return nil, err
	}
	ks.Version, ks.Package = version, pkg
	if ks.KernelSHA, err = hashFile(filepath.Join(out, "vmlinuz")); err != nil {
		return nil, err
	}
	for i, m := range ks.Modules {
		if err := os.WriteFile(filepath.Join(out, "modules", m.Name+".ko"), m.data, 0o644); err != nil {
			return nil, fmt.Errorf("write module: %w", err)
		}
		ks.Modules[i].data = nil
	}
	mf, err := json.MarshalIndent(ks, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(out, manifestName), mf, 0o644); err != nil {
		return nil, fmt.Errorf("write kernel manifest: %w", err)
	}
	dir := filepath.Join(root, version)
	if other, err := installKernel(out, dir); err != nil || other != nil {
		return other, err
	}
	log.Info("kernel cached", "version", version, "dir", dir, "modules", len(ks.Modules))
	if ks = loadCachedKernel(dir); ks == nil {
		return nil, fmt.Errorf("kernel cache %s unreadable right after writing it", dir)
	}
	return ks, nil
}

// installKernel moves the finished cache entry out to dir. When dir
// exists already and is complete, someone else won the race: that entry
// is returned. An entry made for other modules (an older smolvm's list)
// is replaced.
func installKernel(out, dir string) (*kernelSet, error) {
	err := os.Rename(out, dir)
	if err != nil {
		if other := loadCachedKernel(dir); other != nil {
			return other, nil
		}
		stale := out + ".stale"
		if os.Rename(dir, stale) == nil {
			err = os.Rename(out, dir)
			_ = os.RemoveAll(stale)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("move kernel into cache: %w", err)
	}
	return nil, nil
}

// modulesFrom selects DefaultModules (and dependencies) from a module tree,
// keeping their decompressed contents in memory.
func modulesFrom(dir string, log *slog.Logger) (*kernelSet, error) {
	ks := &kernelSet{Wanted: slices.Clone(DefaultModules), Builder: builderVersion}
	if dir == "" {
		return ks, nil
	}
	tree, err := openModuleTree(dir)
	if err != nil {
		return nil, err
	}
	order, err := tree.selectModules(DefaultModules, log)
	if err != nil {
		return nil, err
	}
	for _, name := range order {
		b, err := tree.content(name)
		if err != nil {
			return nil, err
		}
		ks.Modules = append(ks.Modules, kernelMod{Name: name, SHA256: hashBytes(b), data: b})
	}
	return ks, nil
}

// bzImageVersion reads the version string from a bzImage's setup header, or
// returns "" when the file is not a bzImage.
func bzImageVersion(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	hdr := make([]byte, 0x210)
	if _, err := io.ReadFull(f, hdr); err != nil || string(hdr[0x202:0x206]) != "HdrS" {
		return ""
	}
	off := int64(binary.LittleEndian.Uint16(hdr[0x20e:])) + 0x200
	buf := make([]byte, 256)
	n, _ := f.ReadAt(buf, off)
	s := string(buf[:n])
	if i := strings.IndexAny(s, " \x00"); i >= 0 {
		s = s[:i]
	}
	return s
}

func tail(out []byte) string {
	s := strings.TrimSpace(string(out))
	if len(s) > 600 {
		s = "..." + s[len(s)-600:]
	}
	return s
}
