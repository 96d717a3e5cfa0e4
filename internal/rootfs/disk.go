package rootfs

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// CreateOverlay creates a qcow2 file at out whose backing file is base
// (read-only, never written): a copy-on-write disk, made in milliseconds
// whatever base's size. size > 0 makes the overlay that large (it must not
// be smaller than base); 0 keeps base's size.
func CreateOverlay(ctx context.Context, base, baseFormat, out string, size int64) error {
	if err := needTools("qemu-img"); err != nil {
		return err
	}
	if baseFormat == "" {
		baseFormat = "raw"
	}
	args := []string{"create", "-q", "-f", "qcow2", "-b", base, "-F", baseFormat}
	if size > 0 {
		vs, err := VirtualSize(ctx, base)
		if err != nil {
			return err
		}
		if size < vs {
			return fmt.Errorf("disk size %d MiB is smaller than the image (%d MiB)", size/mib, vs/mib)
		}
		args = append(args, out, fmt.Sprint(size))
	} else {
		args = append(args, out)
	}
	if msg, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput(); err != nil {
		os.Remove(out)
		return fmt.Errorf("qemu-img create overlay: %w: %s", err, strings.TrimSpace(string(msg)))
	}
	return nil
}

// VirtualSize is the size a disk file shows the guest.
func VirtualSize(ctx context.Context, path string) (int64, error) {
	format, err := Format(path)
	if err != nil {
		return 0, err
	}
	if format == "raw" {
		st, err := os.Stat(path)
		if err != nil {
			return 0, err
		}
		return st.Size(), nil
	}
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		return 0, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return 0, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	return info.VirtualSize, nil
}

// DiskUsage is the space a file takes on the host (sparse files take less
// than their size).
func DiskUsage(path string) int64 {
	var st = new(syscallStat)
	if err := stat(path, st); err != nil {
		return 0
	}
	return st.Blocks * 512
}
