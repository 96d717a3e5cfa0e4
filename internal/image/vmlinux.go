package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
)

// A bzImage decompresses itself before the kernel starts: under software
// emulation that costs about half a second of every cold boot (measured on
// Debian's cloud kernel, LZ4). Debian builds its kernels with CONFIG_PVH,
// so the vmlinux inside the bzImage can be booted directly through the PVH
// entry point, as the tuned kernel is. The image cache keeps that vmlinux
// next to the bzImage and New boots it; when a kernel has no PVH entry or a
// payload this code cannot unpack, the bzImage boots as before.

// vmlinuxName is the PVH-bootable ELF kept next to a cached bzImage;
// noVmlinuxName records why there is none, so the work is not redone.
const (
	vmlinuxName   = "vmlinux"
	noVmlinuxName = "vmlinux.none"
)

// maxVmlinux bounds what a bzImage's payload may decompress to.
const maxVmlinux = 512 << 20

// bootKernel returns the kernel file to boot from a cache folder holding
// vmlinuz: its PVH vmlinux, extracted on first use, or the bzImage itself.
// It runs on every VM start, so a folder this process cannot write (a cache
// shared read-only) costs a failed file creation, not a decompression.
func bootKernel(dir string) string {
	bz := filepath.Join(dir, "vmlinuz")
	vm := filepath.Join(dir, vmlinuxName)
	if fileExists(vm) {
		return vm
	}
	if fileExists(filepath.Join(dir, noVmlinuxName)) {
		return bz
	}
	if err := extractVmlinux(bz, vm); err != nil {
		if !errors.Is(err, errCannotWrite) {
			_ = writeFileAtomic(filepath.Join(dir, noVmlinuxName), []byte(err.Error()+"\n"))
		}
		return bz
	}
	return vm
}

// errCannotWrite marks an extraction that could not create its output.
var errCannotWrite = errors.New("cannot write the vmlinux")

// extractVmlinux writes the ELF kernel inside a bzImage to dst, if it has a
// PVH entry point. The output file is created first, so that an unwritable
// folder fails before the work.
func extractVmlinux(bzImage, dst string) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".tmp-"+filepath.Base(dst)+"-*")
	if err != nil {
		return fmt.Errorf("%w: %w", errCannotWrite, err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	raw, err := readVmlinux(bzImage)
	if err != nil {
		return err
	}
	if _, err := tmp.Write(raw); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return os.Rename(tmp.Name(), dst)
}

// readVmlinux decompresses a bzImage's kernel and checks its PVH entry.
func readVmlinux(bzImage string) ([]byte, error) {
	b, err := os.ReadFile(bzImage)
	if err != nil {
		return nil, err
	}
	payload, err := bzPayload(b)
	if err != nil {
		return nil, err
	}
	raw, err := decompressPayload(payload)
	if err != nil {
		return nil, err
	}
	return raw, checkPVH(raw)
}

// bzPayload returns the compressed kernel of a bzImage (boot protocol
// 2.08+: payload_offset and payload_length in the setup header).
func bzPayload(b []byte) ([]byte, error) {
	if len(b) < 0x250 || string(b[0x202:0x206]) != "HdrS" {
		return nil, errors.New("not a bzImage")
	}
	if binary.LittleEndian.Uint16(b[0x206:]) < 0x208 {
		return nil, errors.New("boot protocol older than 2.08: no payload fields")
	}
	setupSects := int(b[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects + 1) * 512
	off := start + int(binary.LittleEndian.Uint32(b[0x248:]))
	n := int(binary.LittleEndian.Uint32(b[0x24c:]))
	if off < start || n < 8 || off+n > len(b) {
		return nil, errors.New("bzImage payload out of bounds")
	}
	return b[off : off+n], nil
}

// decompressPayload unpacks a kernel payload. The kernel's build appends
// the decompressed size (32-bit little endian) to every payload.
func decompressPayload(p []byte) ([]byte, error) {
	size := int(binary.LittleEndian.Uint32(p[len(p)-4:]))
	if size <= 0 || size > maxVmlinux {
		return nil, fmt.Errorf("bzImage payload claims %d bytes", size)
	}
	var (
		out []byte
		err error
	)
	switch {
	case bytes.HasPrefix(p, []byte{0x02, 0x21, 0x4c, 0x18}):
		out, err = unlz4Legacy(p[4:len(p)-4], size)
	case bytes.HasPrefix(p, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		var d *zstd.Decoder
		if d, err = zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxVmlinux)); err == nil {
			out, err = d.DecodeAll(p[:len(p)-4], make([]byte, 0, size))
			d.Close()
		}
	case bytes.HasPrefix(p, []byte{0x1f, 0x8b}):
		var r *gzip.Reader
		if r, err = gzip.NewReader(bytes.NewReader(p)); err == nil {
			r.Multistream(false)
			out, err = io.ReadAll(io.LimitReader(r, maxVmlinux))
		}
	case bytes.HasPrefix(p, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		// The kernel's xz payloads use the x86 BCJ filter, which this
		// reader may refuse; the bzImage then boots instead.
		var r *xz.Reader
		if r, err = xz.NewReader(bytes.NewReader(p)); err == nil {
			out, err = io.ReadAll(io.LimitReader(r, maxVmlinux))
		}
	default:
		return nil, fmt.Errorf("unknown bzImage compression (magic % x)", p[:4])
	}
	if err != nil {
		return nil, fmt.Errorf("decompress bzImage payload: %w", err)
	}
	if len(out) != size {
		return nil, fmt.Errorf("bzImage payload decompressed to %d bytes, want %d", len(out), size)
	}
	return out, nil
}

// unlz4Legacy decodes LZ4's legacy frame (what the kernel's lz4 payloads
// use): blocks of a 32-bit compressed size and data, each at most 8 MiB
// decompressed.
func unlz4Legacy(p []byte, size int) ([]byte, error) {
	const legacyMagic, blockMax = 0x184c2102, 8 << 20
	out := make([]byte, 0, size)
	buf := make([]byte, blockMax)
	for len(p) >= 4 {
		n := binary.LittleEndian.Uint32(p)
		p = p[4:]
		if n == legacyMagic { // concatenated frames
			continue
		}
		if int(n) > len(p) {
			return nil, fmt.Errorf("lz4 block of %d bytes past the end", n)
		}
		m, err := lz4.UncompressBlock(p[:n], buf)
		if err != nil {
			return nil, err
		}
		if len(out)+m > size {
			return nil, errors.New("lz4 payload larger than announced")
		}
		out = append(out, buf[:m]...)
		p = p[n:]
	}
	return out, nil
}

// xenNotePhys32Entry is the ELF note (owner "Xen") of a kernel's 32-bit PVH
// entry point.
const xenNotePhys32Entry = 18

// checkPVH accepts an x86-64 ELF kernel with a PVH entry note.
func checkPVH(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("bzImage payload is not an ELF kernel: %w", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("kernel is for %s, not x86-64", f.Machine)
	}
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(io.LimitReader(prog.Open(), 1<<20))
		if err != nil {
			return err
		}
		for len(notes) >= 12 {
			nameSz := int(binary.LittleEndian.Uint32(notes))
			descSz := int(binary.LittleEndian.Uint32(notes[4:]))
			typ := binary.LittleEndian.Uint32(notes[8:])
			next := 12 + align4(nameSz) + align4(descSz)
			if nameSz < 0 || descSz < 0 || next > len(notes) {
				break
			}
			if string(bytes.TrimRight(notes[12:12+nameSz], "\x00")) == "Xen" && typ == xenNotePhys32Entry {
				return nil
			}
			notes = notes[next:]
		}
	}
	return errors.New("kernel has no PVH entry point (CONFIG_PVH)")
}

func align4(n int) int { return (n + 3) &^ 3 }
