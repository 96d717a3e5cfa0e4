package image

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pierrec/lz4/v4"
)

// testELF is a minimal x86-64 ELF with one PT_NOTE segment holding a Xen
// note of type typ, padded with filler bytes.
func testELF(typ uint32, filler int) []byte {
	var note bytes.Buffer
	le := binary.LittleEndian
	_ = binary.Write(&note, le, []uint32{4, 8, typ})
	note.WriteString("Xen\x00")
	_ = binary.Write(&note, le, uint64(0x1000000))

	const ehsize, phsize = 64, 56
	var b bytes.Buffer
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0})
	b.Write(make([]byte, 8))
	_ = binary.Write(&b, le, uint16(2))      // ET_EXEC
	_ = binary.Write(&b, le, uint16(62))     // EM_X86_64
	_ = binary.Write(&b, le, uint32(1))      // version
	_ = binary.Write(&b, le, uint64(0))      // entry
	_ = binary.Write(&b, le, uint64(ehsize)) // phoff
	_ = binary.Write(&b, le, uint64(0))      // shoff
	_ = binary.Write(&b, le, uint32(0))      // flags
	_ = binary.Write(&b, le, []uint16{ehsize, phsize, 1, 64, 0, 0})
	off := uint64(ehsize + phsize)
	_ = binary.Write(&b, le, uint32(4)) // PT_NOTE
	_ = binary.Write(&b, le, uint32(4)) // PF_R
	_ = binary.Write(&b, le, []uint64{off, 0, 0, uint64(note.Len()), uint64(note.Len()), 4})
	b.Write(note.Bytes())
	for i := 0; i < filler; i++ {
		b.WriteByte(byte(i * 7))
	}
	return b.Bytes()
}

func lz4Legacy(t *testing.T, raw []byte) []byte {
	t.Helper()
	out := []byte{0x02, 0x21, 0x4c, 0x18}
	for len(raw) > 0 {
		n := min(len(raw), 8<<20)
		dst := make([]byte, lz4.CompressBlockBound(n))
		m, err := lz4.CompressBlock(raw[:n], dst, nil)
		if err != nil || m == 0 {
			t.Fatalf("lz4: %d, %v", m, err)
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(m))
		out = append(out, dst[:m]...)
		raw = raw[n:]
	}
	return out
}

// testBzImage wraps a compressed payload the way the kernel's build does:
// one setup sector, the payload fields of boot protocol 2.08+, and the
// decompressed size after the payload.
func testBzImage(payload []byte, size int) []byte {
	b := make([]byte, 2*512)
	b[0x1f1] = 1
	copy(b[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(b[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(b[0x248:], 100)
	payload = binary.LittleEndian.AppendUint32(append([]byte(nil), payload...), uint32(size))
	binary.LittleEndian.PutUint32(b[0x24c:], uint32(len(payload)))
	b = append(b, make([]byte, 100)...)
	return append(append(b, payload...), make([]byte, 64)...)
}

func TestExtractVmlinux(t *testing.T) {
	dir := t.TempDir()
	pvh := testELF(xenNotePhys32Entry, 9<<20) // two lz4 blocks
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	if _, err := w.Write(pvh); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	for name, bz := range map[string][]byte{
		"lz4":  testBzImage(lz4Legacy(t, pvh), len(pvh)),
		"gzip": testBzImage(gz.Bytes(), len(pvh)),
	} {
		src, dst := filepath.Join(dir, name+".bz"), filepath.Join(dir, name+".elf")
		if err := os.WriteFile(src, bz, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := extractVmlinux(src, dst); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, pvh) {
			t.Errorf("%s: extracted %d bytes, not the kernel's %d", name, len(got), len(pvh))
		}
	}

	bad := map[string]struct {
		bz   []byte
		want string
	}{
		"no PVH note":  {testBzImage(lz4Legacy(t, testELF(5, 10)), len(testELF(5, 10))), "no PVH entry"},
		"wrong size":   {testBzImage(lz4Legacy(t, pvh), len(pvh)+1), "decompressed to"},
		"truncated":    {testBzImage(lz4Legacy(t, pvh)[:1000], len(pvh)), "past the end"},
		"not bzImage":  {[]byte(strings.Repeat("x", 4096)), "not a bzImage"},
		"unknown comp": {testBzImage([]byte("BZh91AY&SY"), 10), "unknown bzImage compression"},
	}
	for name, c := range bad {
		src := filepath.Join(dir, "bad.bz")
		if err := os.WriteFile(src, c.bz, 0o644); err != nil {
			t.Fatal(err)
		}
		err := extractVmlinux(src, filepath.Join(dir, "bad.elf"))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one containing %q", name, err, c.want)
		}
	}
}

// TestBootKernelFallsBack checks that a kernel without a PVH entry boots as
// the bzImage, and that the reason is kept so the work is not redone.
func TestBootKernelFallsBack(t *testing.T) {
	dir := t.TempDir()
	elf := testELF(5, 10)
	if err := os.WriteFile(filepath.Join(dir, "vmlinuz"), testBzImage(lz4Legacy(t, elf), len(elf)), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := bootKernel(dir); got != filepath.Join(dir, "vmlinuz") {
		t.Errorf("bootKernel = %s, want the bzImage", got)
	}
	if b, err := os.ReadFile(filepath.Join(dir, noVmlinuxName)); err != nil || !strings.Contains(string(b), "PVH") {
		t.Errorf("%s: %q, %v", noVmlinuxName, b, err)
	}

	pvh := testELF(xenNotePhys32Entry, 10)
	if err := os.WriteFile(filepath.Join(dir, "vmlinuz"), testBzImage(lz4Legacy(t, pvh), len(pvh)), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, noVmlinuxName))
	if got := bootKernel(dir); got != filepath.Join(dir, vmlinuxName) {
		t.Errorf("bootKernel = %s, want the vmlinux", got)
	}
}

// TestExtractDebianVmlinux extracts the cached Debian kernel, when this
// machine has one, and checks it is the PVH kernel QEMU can boot.
func TestExtractDebianVmlinux(t *testing.T) {
	// The test cache, or the state folder 'make test' ran setup in.
	matches, _ := filepath.Glob("/var/tmp/smolvm-test-cache/kernel/*/vmlinuz")
	if h := os.Getenv("SMOLVM_HOME"); h != "" {
		more, _ := filepath.Glob(filepath.Join(h, "cache", "kernel", "*", "vmlinuz"))
		matches = append(matches, more...)
	}
	if len(matches) == 0 {
		t.Skip("no Debian kernel cached (run the real-VM tests or 'smolvm setup' first)")
	}
	dst := filepath.Join(t.TempDir(), "vmlinux")
	if err := extractVmlinux(matches[0], dst); err != nil {
		t.Fatalf("Debian's kernel %s: %v", matches[0], err)
	}
}
