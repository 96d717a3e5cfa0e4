package agent

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// hostMount is a host folder the kernel command line asks for
// (smolvm.mount=TAG:ro|rw:PATH), served by a virtiofs device with TAG.
type hostMount struct {
	tag, path string
	readOnly  bool
}

// Bounds of smolvm.mount= (the host checks the same: smolvm.MaxMounts).
const maxHostMounts = 8

var (
	mountTagRE  = regexp.MustCompile(`^smolvm[0-9]$`)
	mountPathRE = regexp.MustCompile(`^(/[A-Za-z0-9._+@~-]+)+$`)
)

// parseHostMounts reads the smolvm.mount= options of a kernel command
// line; anything malformed is an error (the host made them).
func parseHostMounts(cmdline string) ([]hostMount, error) {
	var ms []hostMount
	for _, f := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(f, "smolvm.mount=")
		if !ok {
			continue
		}
		parts := strings.SplitN(v, ":", 3)
		if len(parts) != 3 || !mountTagRE.MatchString(parts[0]) || parts[1] != "ro" && parts[1] != "rw" ||
			len(parts[2]) > 128 || !mountPathRE.MatchString(parts[2]) || filepath.Clean(parts[2]) != parts[2] {
			return nil, fmt.Errorf("malformed smolvm.mount=%q", v)
		}
		ms = append(ms, hostMount{tag: parts[0], path: parts[2], readOnly: parts[1] == "ro"})
	}
	if len(ms) > maxHostMounts {
		return nil, fmt.Errorf("%d host folders: at most %d", len(ms), maxHostMounts)
	}
	// A folder inside another is mounted after it.
	sort.SliceStable(ms, func(i, j int) bool { return len(ms[i].path) < len(ms[j].path) })
	return ms, nil
}

// mountHostFolders mounts the host folders the kernel command line asks
// for. A guest that lacks one must not pass for ready: an error is fatal.
func mountHostFolders(log *slog.Logger) error {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil
	}
	ms, err := parseHostMounts(string(b))
	if err != nil {
		return err
	}
	for _, m := range ms {
		if err := os.MkdirAll(m.path, 0o755); err != nil {
			return fmt.Errorf("host folder %s: %w", m.tag, err)
		}
		// nosuid, nodev: the guest trusts nothing of the host's files.
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
		if m.readOnly {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount(m.tag, m.path, "virtiofs", flags, ""); err != nil {
			return fmt.Errorf("mount host folder %s on %s (does the kernel have virtiofs?): %w", m.tag, m.path, err)
		}
		log.Debug("mounted host folder", "tag", m.tag, "path", m.path, "ro", m.readOnly)
	}
	return nil
}
