package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Disks and memory files of snapshots. A snapshot must hold each writable
// disk exactly as the saved memory knows it: the guest's page cache, its
// file system's in-memory state and virtio-blk's device state all refer to
// it. A VM's isolated disk is a qcow2 overlay in its folder that holds only
// what the VM changed on top of the read-only image, so freezing it is
// cheap: while the machine is paused at the end of the migration, the
// overlay is copied into the snapshot folder (FreezeDisk: sparse, and as a
// reflink where the file system can; a few MB for a freshly booted guest).
// The copy is consistent without asking the guest to sync: stopping the
// machine drains its I/O, and the end of the migration inactivates the
// images, which writes QEMU's qcow2 metadata caches out to the file even
// with cache=unsafe (dirty pages still in the guest's page cache are part
// of the saved memory). The copy keeps the overlay's absolute backing
// path, the image, which stays read-only; `cont` re-activates the source's
// images and it goes on writing to its own overlay. Each VM restored from
// the snapshot gets an overlay of its own whose backing file is the frozen
// copy (Overlay), so clones share the snapshot's disk copy-on-write and
// never see each other's writes.

// Overlay implements hypervisor.Driver: a qcow2 file at path backed by
// the qcow2 file base.
func (d *Driver) Overlay(ctx context.Context, base, path string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path).CombinedOutput()
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("create the disk overlay on snapshot disk %s: %w: %s", base, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// FreezeDisk implements hypervisor.Driver: the qcow2 overlay is copied
// sparse, and as a reflink (copy-on-write, no data copied) where the file
// system supports it.
func (d *Driver) FreezeDisk(ctx context.Context, src, dst string) error {
	return copyDisk(ctx, src, dst)
}

// copyDisk copies a file: sparse, and as a reflink (copy-on-write, no
// data copied) where the file system supports it.
func copyDisk(ctx context.Context, src, dst string) error {
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", src, dst).CombinedOutput(); err != nil {
		_ = os.Remove(dst)
		return fmt.Errorf("copy disk %s: %w: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// FinishDisk implements hypervisor.Driver: it makes a frozen disk
// independent of other snapshots, durable and read-only. A VM restored from a snapshot writes to an overlay whose
// backing file is that snapshot's frozen disk, so a copy of its overlay
// has the older snapshot in its chain: it is rebased onto the image (safe
// mode: the clusters the older snapshot's disk holds are copied in, only
// those), so that every snapshot depends on the image alone and can be
// deleted on its own.
func (d *Driver) FinishDisk(ctx context.Context, path, snapshotsDir string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		return fmt.Errorf("qemu-img info %s: %w%s", path, err, stderrOf(err))
	}
	var chain []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if err := json.Unmarshal(out, &chain); err != nil {
		return fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	if len(chain) > 2 && strings.HasPrefix(chain[1].Filename, snapshotsDir+string(filepath.Separator)) {
		base := chain[2]
		if out, err := exec.CommandContext(ctx, "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", base.Filename, "-F", base.Format, path).CombinedOutput(); err != nil {
			return fmt.Errorf("qemu-img rebase %s onto %s: %w: %s", path, base.Filename, err, strings.TrimSpace(string(out)))
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return os.Chmod(path, 0o400)
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// saveMemory puts a paused machine's memory file into a snapshot: a hard
// link when the machine will not run again (nothing writes to it any
// more), a copy otherwise. Blocks of zeros (the guest's free memory) are
// then punched out, so the file takes disk space only for memory in use
// and clones read the rest as holes.
func saveMemory(ctx context.Context, src, dst string, link bool) error {
	if !link || os.Link(src, dst) != nil {
		if err := copyDisk(ctx, src, dst); err != nil {
			return fmt.Errorf("save memory: %w", err)
		}
	}
	if err := punchZeros(dst); err != nil {
		return fmt.Errorf("save memory: %w", err)
	}
	// Not read-only: QEMU 7.2 opens a private memory file for writing,
	// although a private mapping never writes to it.
	return os.Chmod(dst, 0o600)
}

// punchZeros deallocates the 4 KiB blocks of a file that hold only zeros;
// its size and contents stay the same. On a file system that cannot seek
// to data or punch holes the file is left whole: that costs disk space,
// nothing else.
func punchZeros(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	const block = 4 << 10
	fd := int(f.Fd())
	buf, zero := make([]byte, 1<<20), make([]byte, block)
	var runStart, runEnd int64 // the pending run of zero blocks
	flush := func() error {
		if runEnd > runStart {
			err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, runStart, runEnd-runStart)
			if errors.Is(err, unix.EOPNOTSUPP) {
				return errNoPunch
			}
			if err != nil {
				return fmt.Errorf("punch holes in %s: %w", path, err)
			}
		}
		runStart, runEnd = 0, 0
		return nil
	}
	for off := int64(0); off < fi.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return nil // no SEEK_DATA here: the file stays as it is (only larger)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek %s: %w", path, err)
		}
		for pos := data; pos < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 {
				return fmt.Errorf("read %s: %w", path, err)
			}
			for i := 0; i+block <= n; i += block {
				at := pos + int64(i)
				if !bytes.Equal(buf[i:i+block], zero) {
					continue
				}
				if at != runEnd {
					if err := flush(); errors.Is(err, errNoPunch) {
						return nil // the file stays as it is
					} else if err != nil {
						return err
					}
					runStart = at
				}
				runEnd = at + block
			}
			pos += int64(n)
		}
		off = hole
	}
	if err := flush(); !errors.Is(err, errNoPunch) {
		return err
	}
	return nil // the file stays as it is
}

// errNoPunch: the file system cannot punch holes; the file stays whole.
var errNoPunch = errors.New("hole punching not supported")
