package image

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// A cache entry of the same kernel version made for another module list
// (an older smolvm's) is replaced by a new fetch, not an error.
func TestInstallKernelReplacesStale(t *testing.T) {
	root := t.TempDir()
	entry := func(dir string, wanted []string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, "modules"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "vmlinuz"), []byte("kernel"), 0o644); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(kernelSet{Version: "v", Wanted: wanted, Builder: builderVersion})
		if err := os.WriteFile(filepath.Join(dir, manifestName), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(root, "v")
	entry(dir, []string{"virtio_mmio"}) // stale: another list
	out := filepath.Join(root, ".tmp", "out")
	entry(out, slices.Clone(DefaultModules))
	if other, err := installKernel(out, dir); err != nil || other != nil {
		t.Fatalf("installKernel = %v, %v", other, err)
	}
	if ks := loadCachedKernel(dir); ks == nil {
		t.Fatal("the new entry is not in the cache")
	}
	// A complete entry already there wins.
	entry(out, slices.Clone(DefaultModules))
	if other, err := installKernel(out, dir); err != nil || other == nil {
		t.Fatalf("installKernel over a complete entry = %v, %v; want that entry", other, err)
	}
}
