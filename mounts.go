package smolvm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/smolvm/smolvm/internal/engine"
)

// Mount shares a folder of the host with the guest (virtiofs: see the
// README's "Host folders"). The guest sees it at GuestPath from boot on.
// A read-only mount cannot be written from the guest, not even by its
// root: the host binds the folder read-only for the daemon that serves
// it. A writable one shows the guest's writes on the host at once; what
// the guest makes there belongs to the folder's owner on the host. The
// guest reaches nothing outside the folder.
//
// What is checked is what is mounted: the host path is resolved when
// the VM is made, and at each boot its folder is opened from there
// following no symbolic link and served from what was opened, so a
// folder swapped for a link meanwhile fails the boot instead of sharing
// where the link points.
type Mount struct {
	HostPath  string // an existing folder of the host
	GuestPath string // absolute; not a system folder of the guest (/, /etc, /proc…)
	ReadOnly  bool
	// Within, when set, is a host folder that HostPath must lie beneath,
	// once resolved and again at each boot, where it is opened from
	// Within without following links (openat2 RESOLVE_BENEATH): what a
	// caller sets that allows only the folders under some (smolvm serve
	// --allow-mount), so that nobody who can change the folders there
	// can swap one for a link to elsewhere between its check and the
	// mount.
	Within string `json:",omitempty"`

	// resolved: checkMounts resolved HostPath and Within (New checks a
	// config more than once; a later check must not follow a link that
	// appeared since the first).
	resolved bool
}

// MaxMounts is how many host folders one VM may have.
const MaxMounts = 8

// maxGuestPath bounds a guest path (it travels on the kernel command line).
const maxGuestPath = 128

// guestPathRE is what a guest path may hold: it goes on the kernel
// command line unquoted (no spaces, no ':').
var guestPathRE = regexp.MustCompile(`^(/[A-Za-z0-9._+@~-]+)+$`)

// systemFolders are the guest's own folders that a mount may not cover;
// nothing below the pseudo file systems either.
var systemFolders = []string{"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
	"/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/init"}

var pseudoFolders = []string{"/dev", "/proc", "/run", "/sys"}

// ParseMount reads HOST_DIR:GUEST_DIR[:ro|rw], the form of --mount;
// read-only unless it ends in :rw. A host path may hold ':' (the guest
// path cannot).
func ParseMount(s string) (Mount, error) {
	m := Mount{ReadOnly: true}
	rest := s
	if r, ok := strings.CutSuffix(s, ":rw"); ok {
		rest, m.ReadOnly = r, false
	} else if r, ok := strings.CutSuffix(s, ":ro"); ok {
		rest = r
	}
	i := strings.LastIndexByte(rest, ':')
	if i <= 0 || i == len(rest)-1 {
		return Mount{}, fmt.Errorf("%w: mount %q: use HOST_DIR:GUEST_DIR[:ro|rw]", ErrInvalid, s)
	}
	m.HostPath, m.GuestPath = rest[:i], rest[i+1:]
	return m, nil
}

// checkMounts validates c.Mounts before anything is made: every host
// folder exists and can be served, every guest path is a plain absolute
// path outside the guest's system folders, no two on one guest path. It
// resolves host paths (absolute, symbolic links followed).
func checkMounts(c *Config) error {
	if len(c.Mounts) == 0 {
		return nil
	}
	if len(c.Mounts) > MaxMounts {
		return fmt.Errorf("%w: %d host folders: at most %d", ErrInvalid, len(c.Mounts), MaxMounts)
	}
	seen := map[string]bool{}
	ms := make([]Mount, len(c.Mounts))
	for i, m := range c.Mounts {
		if err := checkMountPoint(m.GuestPath); err != nil {
			return err
		}
		if seen[m.GuestPath] {
			return fmt.Errorf("%w: two host folders on guest path %q: give each its own", ErrInvalid, m.GuestPath)
		}
		seen[m.GuestPath] = true
		host, err := checkHostFolder(m, c.Home)
		if err != nil {
			return err
		}
		ms[i] = Mount{HostPath: host, GuestPath: m.GuestPath, ReadOnly: m.ReadOnly, resolved: true}
		if m.Within != "" {
			if ms[i].Within, err = checkWithin(m, host); err != nil {
				return err
			}
		}
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: host folders need smolvm to run as root (it sandboxes their daemon, virtiofsd, in namespaces only root can make)", ErrUnsupported)
	}
	if _, err := os.Stat(engine.Virtiofsd); err != nil {
		return fmt.Errorf("%w: host folders need %s: run 'smolvm setup' (or apt-get install qemu-system-common)", ErrUnsupported, engine.Virtiofsd)
	}
	c.Mounts = ms
	return nil
}

func checkMountPoint(p string) error {
	switch {
	case p == "" || p[0] != '/':
		return fmt.Errorf("%w: guest path %q: give an absolute path", ErrInvalid, p)
	case len(p) > maxGuestPath:
		return fmt.Errorf("%w: guest path %q: longer than %d bytes", ErrInvalid, p, maxGuestPath)
	case filepath.Clean(p) != p && p != "/":
		return fmt.Errorf("%w: guest path %q: give it without '.', '..', '//' or a trailing '/' (%s)", ErrInvalid, p, filepath.Clean(p))
	}
	for _, s := range systemFolders {
		if p == s {
			return fmt.Errorf("%w: guest path %q is a system folder of the guest: mount the folder elsewhere, e.g. /mnt%s or /work", ErrInvalid, p, strings.TrimSuffix(p, "/"))
		}
	}
	for _, s := range pseudoFolders {
		if strings.HasPrefix(p, s+"/") {
			return fmt.Errorf("%w: guest path %q is inside %s, a system folder of the guest: mount the folder elsewhere, e.g. /work", ErrInvalid, p, s)
		}
	}
	if !guestPathRE.MatchString(p) {
		return fmt.Errorf("%w: guest path %q: use letters, digits and . _ + @ ~ - between the slashes", ErrInvalid, p)
	}
	return nil
}

// checkWithin returns the resolved path of m.Within, or why host (m's
// resolved folder) does not lie beneath it.
func checkWithin(m Mount, host string) (string, error) {
	if !filepath.IsAbs(m.Within) {
		return "", fmt.Errorf("%w: mount on %q: the folder it must lie within, %q, is not an absolute path", ErrInvalid, m.GuestPath, m.Within)
	}
	w, err := filepath.EvalSymlinks(m.Within)
	if err != nil {
		return "", fmt.Errorf("%w: mount on %q: the folder it must lie within: %w", ErrInvalid, m.GuestPath, err)
	}
	if w = filepath.Clean(w); m.resolved && w != m.Within {
		return "", fmt.Errorf("%w: mount on %q: the folder it must lie within, %s, changed since it was checked: %s is on its path", ErrInvalid, m.GuestPath, m.Within, engine.ErrLinkOnPath)
	}
	if host != w && !strings.HasPrefix(host, strings.TrimSuffix(w, "/")+"/") {
		return "", fmt.Errorf("%w: host folder %q (%s once its links are followed) is not within %s: share a folder under it", ErrInvalid, m.HostPath, host, m.Within)
	}
	return w, nil
}

// checkHostFolder returns the resolved path of m's host folder, or why it
// cannot be shared: missing, not a folder, not readable (and, for a
// writable mount, not writable) by its owner, whom its daemon runs as,
// or holding smolvm's state folder.
func checkHostFolder(m Mount, home string) (string, error) {
	if m.HostPath == "" {
		return "", fmt.Errorf("%w: mount on %q: no host folder given", ErrInvalid, m.GuestPath)
	}
	p, err := filepath.Abs(m.HostPath)
	if err == nil {
		p, err = filepath.EvalSymlinks(p)
	}
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%w: host folder %q does not exist: create it or fix the path", ErrInvalid, m.HostPath)
		}
		return "", fmt.Errorf("%w: host folder %q: %w", ErrInvalid, m.HostPath, err)
	}
	if m.resolved && p != m.HostPath {
		return "", fmt.Errorf("%w: host folder %q changed since it was checked: %s (it leads to %s now)", ErrInvalid, m.HostPath, engine.ErrLinkOnPath, p)
	}
	fi, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("%w: host folder %q: %w", ErrInvalid, m.HostPath, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("%w: host folder %q is not a folder", ErrInvalid, m.HostPath)
	}
	// The daemon runs as the folder's owner, without privileges beyond:
	// the owner's permission bits decide.
	need, what := os.FileMode(0o500), "readable"
	if !m.ReadOnly {
		need, what = 0o700, "readable and writable"
	}
	if fi.Mode().Perm()&need != need {
		uid := "?"
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid = strconv.Itoa(int(st.Uid))
		}
		return "", fmt.Errorf("%w: host folder %q is not %s by its owner (uid %s, mode %v), whom smolvm serves it as: chmod u+%s it", ErrInvalid, m.HostPath, what, uid, fi.Mode().Perm(), map[bool]string{true: "rx", false: "rwx"}[m.ReadOnly])
	}
	if home == "" {
		home = Home()
	}
	if h, err := filepath.EvalSymlinks(home); err == nil {
		home = h
	}
	if home = filepath.Clean(home); p == home || strings.HasPrefix(home, p+"/") || strings.HasPrefix(p, home+"/") {
		return "", fmt.Errorf("%w: host folder %q holds or is inside smolvm's state folder %s: share another folder", ErrInvalid, m.HostPath, home)
	}
	return p, nil
}

// afterMountCheck, when set (by tests), runs when the checked mounts go
// into the engine's config, between their last check and their bind.
var afterMountCheck func([]Mount)
