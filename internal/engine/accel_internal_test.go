package engine

import (
	"os"
	"path/filepath"
	"testing"
)

// The KVM probe's cached answer is keyed by the files it depends on: the
// same files give the same key, and a replaced QEMU binary (a package
// upgrade writes a new file) or kernel gives another, without running QEMU.
func TestProbeKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p+".new", []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".new", p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel, initrd, qemu := write("vmlinux", "k1"), write("initrd", "i1"), write("qemu", "q1")
	k := probeKey(kernel, initrd, qemu)
	if probeKey(kernel, initrd, qemu) != k {
		t.Fatal("key is not deterministic")
	}
	write("qemu", "q2")
	k2 := probeKey(kernel, initrd, qemu)
	if k2 == k {
		t.Error("key unchanged after the QEMU binary was replaced")
	}
	write("vmlinux", "k2")
	if probeKey(kernel, initrd, qemu) == k2 {
		t.Error("key unchanged after the kernel was replaced")
	}
}
