package smolvm_test

// Tests of disk images: OCI import through an in-process registry (with a
// whiteout), OCI layout and docker-save files, disk modes (isolated
// overlays, shared read-only base, growing, retaining), corrupt image
// files, image rm of an image in use, and a Debian image with python3
// built with mmdebstrap (cached across runs in the shared test cache).
//
// These tests need root (the builders keep file owners) and QEMU.

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestParseSizeMiB(t *testing.T) {
	for in, want := range map[string]int{"": 0, "300": 300, "2G": 2048, "2g": 2048, "512M": 512, "1.5GiB": 1536, "1T": 1 << 20, "2048K": 2} {
		got, err := smolvm.ParseSizeMiB(in)
		if err != nil || got != want {
			t.Errorf("ParseSizeMiB(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"x", "-1G", "G"} {
		if _, err := smolvm.ParseSizeMiB(bad); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("ParseSizeMiB(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}

func TestDiskConfigRefused(t *testing.T) {
	ctx := context.Background()
	for _, cfg := range []smolvm.Config{
		{DiskMode: "shared"},                               // no image
		{Image: "x", DiskMode: "bogus"},                    // bad mode
		{Image: "x", DiskMode: "shared", RetainDisk: true}, // read-only disk cannot be kept
		{Image: "x", DiskSizeMiB: -1},
	} {
		cfg.Home = t.TempDir()
		if _, err := smolvm.New(ctx, cfg); !errors.Is(err, smolvm.ErrInvalid) {
			t.Errorf("New(%+v) = %v, want ErrInvalid", cfg, err)
		}
	}
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("building disk images needs root")
	}
}

// tarLayer makes an uncompressed layer from entries (name → content;
// a name ending in "/" is a folder, "->target" content is a symlink).
func tarLayer(t *testing.T, entries map[string]string, modes map[string]int64) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c := entries[n]
		h := &tar.Header{Name: n, Mode: 0o644, ModTime: time.Unix(1700000000, 0)}
		switch {
		case strings.HasSuffix(n, "/"):
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		case strings.HasPrefix(c, "->"):
			h.Typeflag, h.Linkname = tar.TypeSymlink, strings.TrimPrefix(c, "->")
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(c))
		}
		if m, ok := modes[n]; ok {
			h.Mode = m
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

var bbImage struct {
	once sync.Once
	img  v1.Image
	err  error
}

// busyboxImage is a two-layer image: the host's static busybox with a few
// applets, /etc/gone.txt and /etc/kept.txt; then a layer whose whiteout
// deletes /etc/gone.txt and that adds /hello.txt.
func busyboxImage(t *testing.T) v1.Image {
	t.Helper()
	bbImage.once.Do(func() {
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			bbImage.err = err
			return
		}
		lower := map[string]string{"bin/": "", "etc/": "", "root/": "", "tmp/": "", "bin/busybox": string(bb),
			"etc/gone.txt": "lower\n", "etc/kept.txt": "kept\n", "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"}
		for _, a := range []string{"sh", "cat", "ls", "touch", "echo", "df", "test", "rm", "mkdir", "stat", "sync", "id", "head", "grep", "wc", "dd", "sleep"} {
			lower["bin/"+a] = "->busybox"
		}
		upper := map[string]string{"etc/": "", "etc/.wh.gone.txt": "", "hello.txt": "hello from layer 2\n"}
		img, err := mutate.AppendLayers(empty.Image,
			tarLayer(t, lower, map[string]int64{"bin/busybox": 0o755, "tmp/": 0o1777}), tarLayer(t, upper, nil))
		if err != nil {
			bbImage.err = err
			return
		}
		cf, err := img.ConfigFile()
		if err != nil {
			bbImage.err = err
			return
		}
		cf.Architecture, cf.OS = "amd64", "linux"
		cf.Config.Env = []string{"PATH=/bin"}
		bbImage.img, bbImage.err = mutate.ConfigFile(img, cf)
	})
	if bbImage.err != nil {
		t.Fatal(bbImage.err)
	}
	return bbImage.img
}

// pushToLocalRegistry serves img from an in-process registry on loopback
// and returns its reference.
func pushToLocalRegistry(t *testing.T, img v1.Image) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(nopLogger())))
	t.Cleanup(srv.Close)
	ref := strings.TrimPrefix(srv.URL, "http://") + "/smolvm/busybox:v1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	return ref
}

// importBusybox pulls the busybox image into home as name.
func importBusybox(t *testing.T, home, imgName string) *smolvm.ImageInfo {
	t.Helper()
	needRoot(t)
	ref := pushToLocalRegistry(t, busyboxImage(t))
	ctx := testutil.Context(t, 5*time.Minute)
	info, err := smolvm.ImportImage(ctx, smolvm.ImportOptions{Home: home, Name: imgName, Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func bootImage(t testing.TB, cfg smolvm.Config) *smolvm.VM {
	t.Helper()
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = testutil.BootTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.BootTimeout+time.Minute)
	defer cancel()
	vm, err := smolvm.New(ctx, cfg)
	if err != nil {
		t.Fatalf("boot image %s: %v", cfg.Image, err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

// sh runs a command and returns its trimmed stdout, failing on non-zero.
func sh(t testing.TB, vm *smolvm.VM, cmd string) string {
	t.Helper()
	res, err := vm.Run(testutil.Context(t, 3*time.Minute), cmd)
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("%s: exit %d: %s%s", cmd, res.ExitCode, res.Stdout, res.Stderr)
	}
	return strings.TrimSpace(string(res.Stdout))
}

func TestOCIRoundTrip(t *testing.T) {
	home := testutil.Home(t)
	info := importBusybox(t, home, "bb")
	if info.Kind != "oci" || info.Digest == "" || info.Rootfs == "" || info.AgentSHA256 == "" {
		t.Fatalf("image info %+v", info)
	}
	vm := bootImage(t, smolvm.Config{Home: home, Image: "bb"})
	if got := sh(t, vm, "cat /hello.txt /etc/kept.txt"); got != "hello from layer 2\nkept" {
		t.Errorf("files = %q", got)
	}
	if got := sh(t, vm, "test -e /etc/gone.txt && echo present || echo whited-out"); got != "whited-out" {
		t.Errorf("/etc/gone.txt: %s (the whiteout of layer 2 must delete it)", got)
	}
	if got := sh(t, vm, "test -x /usr/sbin/smolvm-agent && echo agent"); got != "agent" {
		t.Errorf("agent not injected: %q", got)
	}
	// The same image from an OCI layout folder and a docker-save tarball
	// has the same digest: both are cache hits of the pulled one.
	dir := t.TempDir()
	lp, err := layout.Write(filepath.Join(dir, "layout"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(busyboxImage(t), layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag("smolvm/busybox:v1")
	tb := filepath.Join(dir, "docker.tar")
	if err := tarball.WriteToFile(tb, tag, busyboxImage(t)); err != nil {
		t.Fatal(err)
	}
	ctx := testutil.Context(t, 2*time.Minute)
	for _, f := range []string{filepath.Join(dir, "layout"), tb} {
		got, err := smolvm.ImportImage(ctx, smolvm.ImportOptions{Home: home, Name: "bb-file", File: f})
		if err != nil {
			t.Fatalf("import %s: %v", f, err)
		}
		if got.Digest != info.Digest || got.Fingerprint != info.Fingerprint {
			t.Errorf("import %s: digest %s, fingerprint %s; want %s, %s", f, got.Digest, got.Fingerprint, info.Digest, info.Fingerprint)
		}
	}
	// Garbage is refused with a clear error.
	junk := filepath.Join(dir, "junk.tar")
	if err := os.WriteFile(junk, []byte("not a tarball"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := smolvm.ImportImage(ctx, smolvm.ImportOptions{Home: home, Name: "junk", File: junk}); err == nil || !strings.Contains(err.Error(), "not an OCI layout or docker save tarball") {
		t.Errorf("import of junk: %v", err)
	}
}

func TestIsolatedDisksAndInUse(t *testing.T) {
	home := testutil.Home(t)
	importBusybox(t, home, "bb")
	a := bootImage(t, smolvm.Config{Home: home, Image: "bb", Name: "a"})
	b := bootImage(t, smolvm.Config{Home: home, Image: "bb", Name: "b"})
	sh(t, a, "echo from-a > /root/a.txt && sync")
	sh(t, b, "echo from-b > /root/b.txt && sync")
	if got := sh(t, a, "ls /root"); got != "a.txt" {
		t.Errorf("VM a sees %q in /root", got)
	}
	if got := sh(t, b, "ls /root"); got != "b.txt" {
		t.Errorf("VM b sees %q in /root", got)
	}
	ovl := filepath.Join(a.Dir(), "disk.qcow2")
	if _, err := os.Stat(ovl); err != nil {
		t.Errorf("overlay of VM a: %v", err)
	}
	ctx := testutil.Context(t, time.Minute)
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "bb"); !errors.Is(err, smolvm.ErrInUse) {
		t.Errorf("image rm while in use = %v, want ErrInUse", err)
	}
	// A new VM does not see what the others wrote: the base is unchanged.
	c := bootImage(t, smolvm.Config{Home: home, Image: "bb", Name: "c"})
	if got := sh(t, c, "ls /root | wc -l"); got != "0" {
		t.Errorf("new VM sees files of others in /root: %s", got)
	}
	for _, vm := range []*smolvm.VM{a, b, c} {
		if err := vm.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := testutil.OpenHost(t, home).RemoveImage(ctx, "bb"); err != nil {
		t.Errorf("image rm after the VMs are gone: %v", err)
	}
	if _, err := testutil.OpenHost(t, home).InspectImage(ctx, "bb"); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("inspect of a removed image = %v, want ErrNotFound", err)
	}
}

func TestSharedDiskReadOnly(t *testing.T) {
	home := testutil.Home(t)
	importBusybox(t, home, "bb")
	vm := bootImage(t, smolvm.Config{Home: home, Image: "bb", DiskMode: smolvm.DiskShared})
	res, err := vm.Run(testutil.Context(t, time.Minute), "touch /root/x")
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "Read-only") {
		t.Errorf("write to the shared base: exit %d, %s", res.ExitCode, res.Stderr)
	}
	sh(t, vm, "echo ok > /tmp/x && cat /tmp/x")
	// The agent that switched root keeps its commands in their cgroup
	// and ignores the signals guest root sends it (guard_vm_test.go).
	// (Each command has a cgroup of its own below smolvm-commands.)
	if got := sh(t, vm, "kill -SEGV 1; cat /proc/self/cgroup"); !strings.HasPrefix(got, "0::/smolvm-commands/") {
		t.Errorf("a command on the disk root runs in cgroup %q, want one below 0::/smolvm-commands", got)
	}
	sh(t, vm, "true")
	if _, err := os.Stat(filepath.Join(vm.Dir(), "disk.qcow2")); err == nil {
		t.Error("shared mode made an overlay")
	}
}

func TestDiskGrowAndRetain(t *testing.T) {
	home := testutil.Home(t)
	info := importBusybox(t, home, "bb")
	vm := bootImage(t, smolvm.Config{Home: home, Image: "bb", Name: "grow", DiskSizeMiB: 1024, RetainDisk: true})
	// df -k /: total 1 KiB blocks; the image is a few hundred MiB.
	out := sh(t, vm, "df -k / | tail -n 1")
	var total int64
	if f := strings.Fields(out); len(f) > 1 {
		for _, c := range f[1] {
			total = total*10 + int64(c-'0')
		}
	}
	if total < 900*1024 || info.Size > 900<<20 {
		t.Errorf("root fs after growing to 1 GiB: %q (image %d MiB)", out, info.Size>>20)
	}
	sh(t, vm, "echo kept > /root/k.txt && sync")
	id, name := vm.ID(), vm.Name()
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	kept := testutil.OpenHost(t, home).RetainedDisk(name, id)
	if _, err := os.Stat(kept); err != nil {
		t.Errorf("retained disk: %v", err)
	}
}

func TestCorruptImageFiles(t *testing.T) {
	home := testutil.Home(t)
	info := importBusybox(t, home, "bb")
	ctx := testutil.Context(t, time.Minute)
	data, err := os.ReadFile(info.Rootfs)
	if err != nil {
		t.Fatal(err)
	}
	for what, content := range map[string][]byte{
		"truncated": data[:len(data)/3],
		"empty":     nil,
		"garbage":   bytes.Repeat([]byte("x"), 8192),
	} {
		// Replace, not write through: the file is a hard link to the cache.
		os.Remove(info.Rootfs)
		if err := os.WriteFile(info.Rootfs, content, 0o444); err != nil {
			t.Fatal(err)
		}
		_, err := smolvm.New(ctx, smolvm.Config{Home: home, Image: "bb"})
		if err == nil || !strings.Contains(err.Error(), "corrupt image") || !strings.Contains(err.Error(), "rebuild or re-import") {
			t.Errorf("%s image: New = %v, want a corrupt image error", what, err)
		}
	}
	if _, err := smolvm.New(ctx, smolvm.Config{Home: home, Image: "nope"}); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("unknown image: %v, want ErrNotFound", err)
	}
}

// TestDebianPython builds the python recipe with mmdebstrap (minutes the
// first time, then a cache hit: the Debian tree and the disk are cached
// in the shared test cache) and boots it.
func TestDebianPython(t *testing.T) {
	home := testutil.Home(t)
	needRoot(t)
	if _, err := os.Stat("/usr/bin/mmdebstrap"); err != nil {
		t.Skip("mmdebstrap not installed (apt-get install mmdebstrap)")
	}
	ctx := testutil.Context(t, 30*time.Minute)
	t0 := time.Now()
	var prog bytes.Buffer
	info, err := smolvm.BuildImage(ctx, smolvm.BuildOptions{Home: home, Name: "python", Progress: &prog})
	if err != nil {
		t.Fatalf("build: %v\n%s", err, prog.String())
	}
	t.Logf("python image: %d MiB (%d MiB on disk), built/taken from cache in %s", info.Size>>20, info.DiskUsage>>20, time.Since(t0).Round(time.Millisecond))
	t1 := time.Now()
	vm := bootImage(t, smolvm.Config{Home: home, Image: "python", VCPUs: 2})
	if got := sh(t, vm, "python3 -c 'print(6*7)'"); got != "42" {
		t.Errorf("python3 printed %q", got)
	}
	t.Logf("create → first python3 output: %s", time.Since(t1).Round(time.Millisecond))
	if got := sh(t, vm, "dpkg -l | grep -c '^ii'"); got == "0" {
		t.Errorf("dpkg -l lists no packages")
	}
	sh(t, vm, "dpkg -l python3 git curl ca-certificates python3-venv")
	// The guest root is the disk, writable in isolated mode.
	sh(t, vm, "python3 -m venv --without-pip /root/venv && /root/venv/bin/python -c 'import sys; print(sys.prefix)'")
	ims, err := testutil.OpenHost(t, home).Images(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, im := range ims {
		names = append(names, im.Name)
	}
	if strings.Join(names, ",") != "default,python" {
		t.Errorf("images = %v, want default and python", names)
	}
}

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// TestPrune uses a home with a cache of its own: prune must not empty the
// shared test cache.
func TestPrune(t *testing.T) {
	needRoot(t)
	testutil.Agent(t)
	home := t.TempDir()
	ref := pushToLocalRegistry(t, busyboxImage(t))
	ctx := testutil.Context(t, 5*time.Minute)
	for _, n := range []string{"one", "two"} {
		if _, err := smolvm.ImportImage(ctx, smolvm.ImportOptions{Home: home, Name: n, Ref: ref}); err != nil {
			t.Fatal(err)
		}
	}
	ims, err := testutil.OpenHost(t, home).Images(ctx)
	if err != nil || len(ims) != 2 {
		t.Fatalf("ListImages = %d images, %v; want 2", len(ims), err)
	}
	rep, err := testutil.OpenHost(t, home).PruneImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(rep.Images, ",") != "one,two" || len(rep.Cache) != 1 {
		t.Errorf("prune removed images %v, cache %v", rep.Images, rep.Cache)
	}
	if left, _ := filepath.Glob(filepath.Join(home, "cache", "rootfs", "*.img")); len(left) > 0 {
		t.Errorf("cache left: %v", left)
	}
	if ims, _ := testutil.OpenHost(t, home).Images(ctx); len(ims) != 0 {
		t.Errorf("images left after prune: %d", len(ims))
	}
}

// TestDiskOverlayBounded: a VM's overlay can grow to its disk's size and
// no further: a guest that fills its disk leaves an overlay within the
// disk's size and qcow2's tables; a disk larger than the state folder has
// room for is refused, naming the folder and the size. Before, a 1 PiB
// --disk-size was accepted on a host disk of a few dozen GiB.
func TestDiskOverlayBounded(t *testing.T) {
	home := testutil.Home(t)
	info := importBusybox(t, home, "bb")
	ctx := testutil.Context(t, 5*time.Minute)

	_, err := smolvm.New(ctx, smolvm.Config{Home: home, Image: "bb", Name: "huge", DiskSizeMiB: 1 << 30})
	if err == nil || !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "not enough space on "+home) {
		t.Errorf("a 1 PiB disk: %v; want an error naming %s and the size", err, home)
	}
	if vms, _ := testutil.OpenHost(t, home).List(ctx); len(vms) != 0 {
		t.Errorf("a refused create left %d VMs", len(vms))
	}

	vm := bootImage(t, smolvm.Config{Home: home, Image: "bb", Name: "fill"}) // the image's size
	// Fill the disk (dd stops at ENOSPC), twice over, and flush.
	for range 2 {
		sh(t, vm, "dd if=/dev/zero of=/root/fill bs=1M 2>/dev/null; rm -f /root/fill; sync")
	}
	sh(t, vm, "dd if=/dev/zero of=/root/fill bs=1M 2>/dev/null; sync; true")
	overlay := filepath.Join(vm.Dir(), "disk.qcow2")
	fi, err := os.Stat(overlay)
	if err != nil {
		t.Fatal(err)
	}
	used := fi.Sys().(*syscall.Stat_t).Blocks * 512
	if limit := info.Size + info.Size/1024 + 1<<20; used > limit || fi.Size() > limit {
		t.Errorf("after the guest filled its %d-byte disk the overlay takes %d bytes (file size %d); want at most %d", info.Size, used, fi.Size(), limit)
	}
	t.Logf("overlay after filling a %d-byte disk: %d bytes on disk, file size %d", info.Size, used, fi.Size())
}
