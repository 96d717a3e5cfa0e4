package rootfs

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

const mib = 1 << 20

// treeUsage sums the blocks and inodes a tree needs.
func treeUsage(root string) (bytes int64, inodes int64, err error) {
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		inodes++
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			bytes += st.Blocks * 512
		} else {
			bytes += fi.Size()
		}
		return nil
	})
	return bytes, inodes, err
}

// DefaultSize picks a disk size for a tree of used bytes: a quarter more
// plus 256 MiB of room, rounded up to 64 MiB.
func DefaultSize(used int64) int64 {
	s := used + used/4 + 256*mib
	return (s + 64*mib - 1) / (64 * mib) * (64 * mib)
}

// MakeExt4 writes the tree at root into a new raw ext4 file out of size
// bytes (0 = DefaultSize) with mkfs.ext4 -d: no loop mount, no root needed
// for this step. Inode tables and the journal are initialised now, so the
// guest kernel does not write them lazily into each VM's overlay.
func MakeExt4(ctx context.Context, root, out string, size int64) error {
	if err := needTools("mkfs.ext4"); err != nil {
		return err
	}
	used, inodes, err := treeUsage(root)
	if err != nil {
		return fmt.Errorf("measure the tree: %w", err)
	}
	if size == 0 {
		size = DefaultSize(used)
	}
	if size < used+used/20+16*mib {
		return fmt.Errorf("disk size %d MiB is too small for %d MiB of files: give at least %d MiB",
			size/mib, used/mib, (used+used/10+32*mib)/mib)
	}
	f, err := os.OpenFile(out, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	n := inodes*2 + 16384
	cmd := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "smolvm-root", "-m", "0",
		"-N", fmt.Sprint(n), "-J", "size=16", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", root, out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 -d: %w: %s", err, strings.TrimSpace(string(msg)))
	}
	return nil
}

// Format tells a disk file's format: "qcow2" or "raw".
func Format(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return "", fmt.Errorf("%w: %s: file too short to be a disk (%v)", ErrCorrupt, path, err)
	}
	if bytes.Equal(magic[:], []byte("QFI\xfb")) {
		return "qcow2", nil
	}
	return "raw", nil
}

// Validate checks that path is a bootable root disk: a raw file holding an
// ext4 file system whose size the file covers, or a qcow2 file that
// qemu-img check accepts. Errors wrap ErrCorrupt and say what is wrong.
func Validate(ctx context.Context, path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Size() == 0 {
		return fmt.Errorf("%w: %s is empty", ErrCorrupt, path)
	}
	format, err := Format(path)
	if err != nil {
		return err
	}
	if format == "qcow2" {
		if err := needTools("qemu-img"); err != nil {
			return err
		}
		out, err := exec.CommandContext(ctx, "qemu-img", "check", "-q", "-f", "qcow2", path).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s: qemu-img check: %s", ErrCorrupt, path, strings.TrimSpace(string(out)))
		}
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return fmt.Errorf("%w: %s: no ext4 superblock (file of %d bytes): %v", ErrCorrupt, path, st.Size(), err)
	}
	if binary.LittleEndian.Uint16(sb[56:]) != 0xEF53 {
		return fmt.Errorf("%w: %s has no ext4 file system (bad superblock magic)", ErrCorrupt, path)
	}
	blocks := uint64(binary.LittleEndian.Uint32(sb[4:]))
	const incompat64bit = 0x80
	if binary.LittleEndian.Uint32(sb[96:])&incompat64bit != 0 {
		blocks |= uint64(binary.LittleEndian.Uint32(sb[0x150:])) << 32
	}
	bs := uint64(1024) << binary.LittleEndian.Uint32(sb[24:])
	if need := blocks * bs; uint64(st.Size()) < need {
		return fmt.Errorf("%w: %s is truncated: %d bytes, its file system needs %d", ErrCorrupt, path, st.Size(), need)
	}
	return nil
}
