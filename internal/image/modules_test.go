package image

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

const syntheticModulesDep = `kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko
kernel/x/a.ko: kernel/x/b.ko
kernel/x/b.ko: kernel/x/a.ko
`

func TestLoadOrderFromModulesDep(t *testing.T) {
	deps, paths, err := parseModulesDep(strings.NewReader(syntheticModulesDep))
	if err != nil {
		t.Fatal(err)
	}
	if got := paths["virtio_rng"]; got != "kernel/drivers/char/hw_random/virtio-rng.ko.xz" {
		t.Errorf("path of virtio_rng = %q", got)
	}
	depFn := func(name string) ([]string, error) {
		ds, ok := deps[name]
		if !ok {
			return nil, fmt.Errorf("unknown module %s", name)
		}
		return ds, nil
	}
	tests := []struct {
		roots   []string
		want    []string
		wantErr string
	}{
		{roots: []string{"virtio"}, want: []string{"virtio"}},
		{roots: []string{"virtio_mmio"}, want: []string{"virtio_ring", "virtio", "virtio_mmio"}},
		{roots: []string{"virtio_mmio", "virtio_console"}, want: []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_console"}},
		{roots: []string{"virtio_net"}, want: []string{"failover", "net_failover", "virtio_ring", "virtio", "virtio_net"}},
		{roots: []string{"vmw_vsock_virtio_transport", "virtio_rng"}, want: []string{"vsock", "vmw_vsock_virtio_transport_common", "virtio_ring", "virtio", "vmw_vsock_virtio_transport", "virtio_rng"}},
		{roots: []string{"virtio_console", "virtio_console"}, want: []string{"virtio_ring", "virtio", "virtio_console"}},
		{roots: nil, want: nil},
		{roots: []string{"a"}, wantErr: "cycle"},
		{roots: []string{"nope"}, wantErr: "unknown module"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.roots, "+"), func(t *testing.T) {
			got, err := loadOrder(tc.roots, depFn)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("order = %v, want %v", got, tc.want)
			}
			assertDepsFirst(t, got, depFn)
		})
	}
}

// assertDepsFirst checks that every module comes after its dependencies.
func assertDepsFirst(t *testing.T, order []string, deps func(string) ([]string, error)) {
	t.Helper()
	pos := map[string]int{}
	for i, m := range order {
		pos[m] = i
	}
	for i, m := range order {
		ds, _ := deps(m)
		for _, d := range ds {
			if j, ok := pos[d]; !ok || j > i {
				t.Errorf("%s loads before its dependency %s in %v", m, d, order)
			}
		}
	}
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/char/hw_random/virtio-rng.ko.xz": "virtio_rng",
		"virtio_console.ko":          "virtio_console",
		"overlay.ko.gz":              "overlay",
		"vmw_vsock_virtio_transport": "vmw_vsock_virtio_transport",
	} {
		if got := moduleName(in); got != want {
			t.Errorf("moduleName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestModuleTreeWithDepAndBuiltin selects from a fake tree with a modules.dep
// (module contents are never parsed then) and a modules.builtin.
func TestModuleTreeWithDepAndBuiltin(t *testing.T) {
	dir := t.TempDir()
	deps, paths, err := parseModulesDep(strings.NewReader(syntheticModulesDep))
	if err != nil {
		t.Fatal(err)
	}
	_ = deps
	for _, p := range paths {
		if strings.HasSuffix(p, ".xz") {
			continue // an xz file would need real content; drop virtio_rng
		}
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte("module "+p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir, "modules.dep"), syntheticModulesDep)
	writeFile(t, filepath.Join(dir, "modules.builtin"), "kernel/fs/ext4/ext4.ko\n")
	tree, err := openModuleTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tree.selectModules([]string{"virtio_mmio", "ext4", "virtio-rng", "virtio_console", "missing_mod"}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_console"}
	if !slices.Equal(got, want) {
		t.Fatalf("selected %v, want %v", got, want)
	}
	b, err := tree.content("virtio_mmio")
	if err != nil || !strings.HasPrefix(string(b), "module ") {
		t.Fatalf("content = %q, %v", b, err)
	}
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestParseCPUMHz(t *testing.T) {
	for in, want := range map[string]int{
		"processor\t: 0\ncpu MHz\t\t: 2096.001\ncpu MHz\t\t: 1000.0\n": 2096001,
		"processor\t: 0\n":       0,
		"cpu MHz\t\t: garbage\n": 0,
	} {
		if got := parseCPUMHz([]byte(in)); got != want {
			t.Errorf("parseCPUMHz(%q) = %d, want %d", in, got, want)
		}
	}
}
