package image

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
)

func needBusybox(t testing.TB) {
	t.Helper()
	if err := checkStatic(DefaultBusybox); err != nil {
		t.Skipf("no static busybox: %v", err)
	}
}

type entry struct {
	hdr  cpio.Header
	data []byte
}

func readArchive(t testing.TB, path string) map[string]entry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := cpio.NewReader(f)
	got := map[string]entry{}
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			return got
		}
		if err != nil {
			t.Fatalf("read %s: %v", path, err)
		}
		data, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := got[h.Name]; dup {
			t.Errorf("duplicate entry %s", h.Name)
		}
		got[h.Name] = entry{*h, data}
	}
}

// fakeKernel makes a kernel file and a module tree with a modules.dep.
func fakeKernel(t testing.TB) (kernel, modDir string) {
	dir := t.TempDir()
	kernel = filepath.Join(dir, "vmlinuz")
	writeFile(t, kernel, "not really a kernel")
	modDir = filepath.Join(dir, "modules")
	dep := "kernel/virtio.ko:\nkernel/virtio_ring.ko:\n" +
		"kernel/virtio_mmio.ko: kernel/virtio_ring.ko kernel/virtio.ko\n" +
		"kernel/virtio_console.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
	if err := os.MkdirAll(filepath.Join(modDir, "kernel"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(modDir, "modules.dep"), dep)
	for _, m := range []string{"virtio", "virtio_ring", "virtio_mmio", "virtio_console"} {
		writeFile(t, filepath.Join(modDir, "kernel", m+".ko"), "code of "+m)
	}
	return kernel, modDir
}

func TestInitramfsContents(t *testing.T) {
	needBusybox(t)
	kernel, modDir := fakeKernel(t)
	agent := filepath.Join(t.TempDir(), "agent")
	writeFile(t, agent, "#!agent v1")
	d, err := EnsureDefault(context.Background(), Options{
		CacheDir: t.TempDir(), AgentPath: agent, KernelPath: kernel, ModulesDir: modDir, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := readArchive(t, d.Initrd)

	init := got["init"]
	if string(init.data) != "#!agent v1" || init.hdr.Mode != cpio.TypeReg|0o755 {
		t.Errorf("/init = %q mode %o", init.data, init.hdr.Mode)
	}
	bb, _ := os.ReadFile(DefaultBusybox)
	if e := got["bin/busybox"]; !bytes.Equal(e.data, bb) || e.hdr.Mode.Perm() != 0o755 {
		t.Errorf("/bin/busybox differs from %s or mode %o", DefaultBusybox, e.hdr.Mode)
	}
	applets, err := busyboxApplets(context.Background(), DefaultBusybox)
	if err != nil {
		t.Fatal(err)
	}
	links := 0
	for _, a := range applets {
		if !strings.Contains(a, "/") || a == "bin/busybox" {
			continue
		}
		e, ok := got[a]
		if !ok {
			t.Errorf("no link for applet %s", a)
			continue
		}
		links++
		if e.hdr.Mode&^cpio.ModePerm != cpio.TypeSymlink || e.hdr.Linkname != "/bin/busybox" {
			t.Errorf("%s: mode %o link %q", a, e.hdr.Mode, e.hdr.Linkname)
		}
	}
	for _, want := range []string{"bin/sh", "bin/ls", "bin/mount"} {
		if got[want].hdr.Linkname != "/bin/busybox" {
			t.Errorf("missing applet link %s", want)
		}
	}
	t.Logf("%d applet links", links)
	if b, ok := got["bin/bash"]; !ok || b.hdr.Mode&cpio.ModePerm != 0o755 || !strings.HasPrefix(string(b.data), "#!/bin/sh\n") {
		t.Errorf("bin/bash: want an executable script that runs busybox's sh")
	}

	wantOrder := "/lib/modules/virtio_ring.ko\n/lib/modules/virtio.ko\n/lib/modules/virtio_mmio.ko\n/lib/modules/virtio_console.ko\n"
	if list := string(got["etc/smolvm/modules"].data); list != wantOrder {
		t.Errorf("module list:\n%s\nwant:\n%s", list, wantOrder)
	}
	if want := []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_console"}; strings.Join(d.Modules, ",") != strings.Join(want, ",") {
		t.Errorf("Default.Modules = %v", d.Modules)
	}
	for _, m := range []string{"virtio", "virtio_ring", "virtio_mmio", "virtio_console"} {
		if string(got["lib/modules/"+m+".ko"].data) != "code of "+m {
			t.Errorf("module %s content %q", m, got["lib/modules/"+m+".ko"].data)
		}
	}
	for _, dir := range []string{"proc", "sys", "dev", "tmp", "run", "root", "mnt", "var/tmp", "etc/smolvm"} {
		if !got[dir].hdr.Mode.IsDir() {
			t.Errorf("missing dir /%s", dir)
		}
	}
	for _, f := range []string{"etc/passwd", "etc/group", "etc/hosts", "etc/nsswitch.conf"} {
		if len(got[f].data) == 0 {
			t.Errorf("missing or empty /%s", f)
		}
	}
	if !strings.HasPrefix(string(got["etc/passwd"].data), "root:x:0:0:") {
		t.Errorf("/etc/passwd = %q", got["etc/passwd"].data)
	}
}

func TestFingerprintAndCache(t *testing.T) {
	needBusybox(t)
	kernel, modDir := fakeKernel(t)
	agent := filepath.Join(t.TempDir(), "agent")
	writeFile(t, agent, "agent v1")
	opts := Options{CacheDir: t.TempDir(), AgentPath: agent, KernelPath: kernel, ModulesDir: modDir, Logger: testLogger(t)}
	ctx := context.Background()

	d1, err := EnsureDefault(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	st1, err := os.Stat(d1.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	d2, err := EnsureDefault(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cached EnsureDefault took %v", time.Since(start))
	st2, _ := os.Stat(d2.Initrd)
	if d2.Fingerprint != d1.Fingerprint || d2.Initrd != d1.Initrd || !os.SameFile(st1, st2) || !st2.ModTime().Equal(st1.ModTime()) {
		t.Errorf("cache not reused: %+v vs %+v", d1, d2)
	}

	writeFile(t, agent, "agent v2")
	d3, err := EnsureDefault(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if d3.Fingerprint == d1.Fingerprint || d3.Initrd == d1.Initrd {
		t.Errorf("fingerprint did not change with the agent: %s", d3.Fingerprint)
	}
	if e := readArchive(t, d3.Initrd)["init"]; string(e.data) != "agent v2" {
		t.Errorf("/init = %q after agent change", e.data)
	}

	writeFile(t, filepath.Join(modDir, "kernel", "virtio.ko"), "new code of virtio")
	d4, err := EnsureDefault(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if d4.Fingerprint == d3.Fingerprint {
		t.Errorf("fingerprint did not change with a module")
	}

	// Same inputs in a fresh cache give the same fingerprint and bytes.
	opts.CacheDir = t.TempDir()
	d5, err := EnsureDefault(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(d4.Initrd)
	b, _ := os.ReadFile(d5.Initrd)
	if d5.Fingerprint != d4.Fingerprint || !bytes.Equal(a, b) {
		t.Errorf("build not reproducible: %s vs %s", d4.Fingerprint, d5.Fingerprint)
	}
}

func TestMissingAgent(t *testing.T) {
	kernel, _ := fakeKernel(t)
	_, err := EnsureDefault(context.Background(), Options{CacheDir: t.TempDir(), AgentPath: "/nonexistent/agent", KernelPath: kernel})
	if err == nil || !strings.Contains(err.Error(), "guest agent") {
		t.Fatalf("err = %v", err)
	}
}

func TestCheckStatic(t *testing.T) {
	exe, err := os.Executable() // the test binary: static or not depending on cgo
	if err != nil {
		t.Fatal(err)
	}
	_ = checkStatic(exe)
	if err := checkStatic("/bin/sh"); err == nil {
		t.Log("/bin/sh is static on this host")
	} else if !strings.Contains(err.Error(), "busybox-static") {
		t.Errorf("error does not say what to install: %v", err)
	}
}

func TestHashFileCached(t *testing.T) {
	cache, dir := t.TempDir(), t.TempDir()
	p := filepath.Join(dir, "agent")
	if err := os.WriteFile(p, []byte("version one"), 0o755); err != nil {
		t.Fatal(err)
	}
	want, _ := hashFile(p)
	for i := 0; i < 2; i++ { // computed, then remembered
		if got, err := hashFileCached(cache, p); err != nil || got != want {
			t.Fatalf("hashFileCached = %q, %v; want %q", got, err, want)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(cache, "hashes")); len(ents) != 1 {
		t.Errorf("hash cache holds %d files, want 1", len(ents))
	}
	// Same size, new content, another modification time: a new hash.
	if err := os.WriteFile(p, []byte("version two"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p, time.Now(), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	want2, _ := hashFile(p)
	if got, err := hashFileCached(cache, p); err != nil || got != want2 || got == want {
		t.Fatalf("after a rewrite: %q, %v; want %q", got, err, want2)
	}
	// Another process finds the cache file; a damaged one is ignored.
	hashes = sync.Map{}
	ents, _ := os.ReadDir(filepath.Join(cache, "hashes"))
	for _, e := range ents {
		if err := os.WriteFile(filepath.Join(cache, "hashes", e.Name()), []byte("garbage"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := hashFileCached(cache, p); err != nil || got != want2 {
		t.Fatalf("with a damaged cache file: %q, %v; want %q", got, err, want2)
	}
	if _, err := hashFileCached(cache, filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing file hashed without error")
	}
}
