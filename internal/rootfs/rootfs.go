// Package rootfs builds the ext4 root disks smolvm guests can boot: from
// Debian packages (mmdebstrap) or from OCI / Docker images
// (go-containerregistry), with the guest agent injected, and it creates the
// copy-on-write overlays VMs run on.
//
// A built disk is a raw ext4 file written without loop mounts
// (mkfs.ext4 -d), cached under CacheDir/rootfs/<fingerprint>.img, where
// the fingerprint covers every input (suite, packages, script, image
// digest, agent, size and the builder version). Building needs root: the
// tree must keep the file owners of the packages or layers (mmdebstrap
// --mode=root, tar --same-owner, device nodes).
package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/wire"
)

// BuilderVersion changes whenever what the builders produce changes, so
// that old cache entries are not reused.
const BuilderVersion = "smolvm-rootfs/2" // 2: OCI images carry their run config (wire.ImageConfigPath)

// AgentPath is where the builders install the guest agent in a disk.
const AgentPath = "/usr/sbin/smolvm-agent"

// ErrCorrupt marks an image file that is not a usable disk.
var ErrCorrupt = errors.New("corrupt image")

// Result is a disk in the cache.
type Result struct {
	Path        string // raw ext4 file in the cache (read-only)
	Fingerprint string // hex sha256 of the inputs
	Digest      string // source digest: the OCI image's, or the disk file's for Debian builds
	Cached      bool   // true when nothing was built
	Size        int64  // virtual size in bytes
	Took        time.Duration
	Info        Info
}

// Info is what the cache records next to a disk (<fingerprint>.json).
type Info struct {
	Kind        string    `json:"kind"` // "debian" or "oci"
	Source      string    `json:"source"`
	Digest      string    `json:"digest,omitempty"`
	Suite       string    `json:"suite,omitempty"`
	Variant     string    `json:"variant,omitempty"`
	Mirror      string    `json:"mirror,omitempty"`
	Packages    []string  `json:"packages,omitempty"`
	Script      string    `json:"script,omitempty"`
	AgentSHA256 string    `json:"agent_sha256"`
	Builder     string    `json:"builder"`
	Built       time.Time `json:"built"`
	BuildTime   string    `json:"build_time"`
	// Config is an OCI image's run config (env, working folder, user,
	// entrypoint, cmd, exposed ports), also written into the disk at
	// wire.ImageConfigPath for the agent.
	Config *wire.ImageConfig `json:"image_config,omitempty"`
}

func cacheDir(root string) string { return filepath.Join(root, "rootfs") }

// CachePath is the cached disk of a fingerprint.
func CachePath(cacheRoot, fp string) string {
	return filepath.Join(cacheDir(cacheRoot), fp+".img")
}

// cached returns the cache entry for fp when it is complete.
func cached(cacheRoot, fp string) (*Result, bool) {
	p := CachePath(cacheRoot, fp)
	st, err := os.Stat(p)
	if err != nil {
		return nil, false
	}
	var info Info
	b, err := os.ReadFile(strings.TrimSuffix(p, ".img") + ".json")
	if err != nil || json.Unmarshal(b, &info) != nil {
		return nil, false
	}
	return &Result{Path: p, Fingerprint: fp, Digest: info.Digest, Cached: true, Size: st.Size(), Info: info}, true
}

// commit moves a finished disk into the cache, with its info.
func commit(cacheRoot, fp, tmpImg string, info Info) (*Result, error) {
	p := CachePath(cacheRoot, fp)
	if err := os.Chmod(tmpImg, 0o444); err != nil {
		return nil, err
	}
	b, _ := json.MarshalIndent(info, "", "  ")
	if err := writeFileAtomic(strings.TrimSuffix(p, ".img")+".json", b); err != nil {
		return nil, err
	}
	if err := os.Rename(tmpImg, p); err != nil {
		return nil, fmt.Errorf("move disk into the cache: %w", err)
	}
	st, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	return &Result{Path: p, Fingerprint: fp, Digest: info.Digest, Size: st.Size(), Info: info}, nil
}

// CacheEntries lists the fingerprints in the disk cache.
func CacheEntries(cacheRoot string) []string {
	m, _ := filepath.Glob(filepath.Join(cacheDir(cacheRoot), "*.img"))
	var out []string
	for _, p := range m {
		out = append(out, strings.TrimSuffix(filepath.Base(p), ".img"))
	}
	return out
}

// RemoveCacheEntry deletes a cached disk and its info.
func RemoveCacheEntry(cacheRoot, fp string) error {
	p := CachePath(cacheRoot, fp)
	return errors.Join(ignoreMissing(os.Remove(p)), ignoreMissing(os.Remove(strings.TrimSuffix(p, ".img")+".json")))
}

// RemoveStaleBuilds deletes build folders left by interrupted builds
// (older than an hour, so that running builds are not disturbed).
func RemoveStaleBuilds(cacheRoot string) []string {
	m, _ := filepath.Glob(filepath.Join(cacheDir(cacheRoot), ".build-*"))
	var out []string
	for _, p := range m {
		if st, err := os.Stat(p); err == nil && time.Since(st.ModTime()) > time.Hour {
			if os.RemoveAll(p) == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

func ignoreMissing(err error) error {
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// needRoot explains what building needs when not run as root.
func needRoot(what string) error {
	if os.Geteuid() == 0 {
		return nil
	}
	return fmt.Errorf("%s needs root: the disk must keep the files' owners and device nodes "+
		"(mmdebstrap --mode=root, tar --same-owner, mknod); run it as root (sudo smolvm image ...)", what)
}

// needTools checks that the programs are in PATH.
func needTools(tools ...string) error {
	var missing []string
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	pkgs := map[string]string{"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils", "tar": "tar"}
	var names []string
	for _, m := range missing {
		names = append(names, pkgs[m])
	}
	return fmt.Errorf("%s not found: apt-get install %s", strings.Join(missing, ", "), strings.Join(names, " "))
}

// lock takes an exclusive flock, waiting until ctx ends.
func lock(ctx context.Context, path string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close(); os.Remove(path) }, nil
		}
		if err != unix.EWOULDBLOCK {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for build lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// HashFile is the hex sha256 of a file.
func HashFile(path string) (string, error) {
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

func fingerprint(parts ...string) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", BuilderVersion)
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// buildDir makes a scratch folder next to the cache (same file system, so
// the finished disk is renamed, not copied).
func buildDir(cacheRoot string) (string, error) {
	if err := os.MkdirAll(cacheDir(cacheRoot), 0o755); err != nil {
		return "", fmt.Errorf("create disk cache: %w", err)
	}
	return os.MkdirTemp(cacheDir(cacheRoot), ".build-")
}

// InjectAgent installs the agent at AgentPath in the tree and creates the
// folders the guest's init mounts on, so that a read-only root works too.
func InjectAgent(root, agent string) error {
	for _, d := range []struct {
		name string
		mode os.FileMode
	}{{"proc", 0o555}, {"sys", 0o555}, {"dev", 0o755}, {"run", 0o755}, {"tmp", 0o1777}, {"root", 0o700}, {"usr/sbin", 0o755}, {"etc", 0o755}} {
		p := filepath.Join(root, d.name)
		if fi, err := os.Lstat(p); err == nil && (fi.IsDir() || fi.Mode()&os.ModeSymlink != 0) {
			continue
		}
		if err := os.MkdirAll(p, d.mode); err != nil {
			return fmt.Errorf("create /%s: %w", d.name, err)
		}
		_ = os.Chmod(p, d.mode)
	}
	dst := filepath.Join(root, AgentPath)
	// usr/sbin may be a symlink (merged /usr): resolve inside root.
	if fi, err := os.Lstat(filepath.Join(root, "usr")); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		dst = filepath.Join(root, "sbin", filepath.Base(AgentPath))
	}
	_ = os.Remove(dst)
	in, err := os.Open(agent)
	if err != nil {
		return fmt.Errorf("guest agent: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("install the agent: %w", err)
	}
	return out.Close()
}

// stepWriter prints progress lines.
type stepWriter struct{ w io.Writer }

func (s stepWriter) printf(format string, args ...any) {
	if s.w != nil {
		fmt.Fprintf(s.w, format+"\n", args...)
	}
}
