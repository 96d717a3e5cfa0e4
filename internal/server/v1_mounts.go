package server

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/smolvm/smolvm"
)

// mountJSON is a host folder in a create body; read_only defaults to true.
type mountJSON struct {
	HostPath  string `json:"host_path"`
	GuestPath string `json:"guest_path"`
	ReadOnly  *bool  `json:"read_only"`
}

// allowedDirs resolves the folders the operator allows mounts under
// (--allow-mount): each must be an existing folder; symbolic links are
// followed, so that a host path is compared with where the folder is.
func allowedDirs(dirs []string) ([]string, error) {
	out := make([]string, 0, len(dirs))
	for _, d := range dirs {
		if !filepath.IsAbs(d) {
			abs, err := filepath.Abs(d)
			if err != nil {
				return nil, fmt.Errorf("%w: --allow-mount %q: %w", smolvm.ErrInvalid, d, err)
			}
			d = abs
		}
		r, err := filepath.EvalSymlinks(d)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: --allow-mount %s does not exist: create it or fix the path", smolvm.ErrInvalid, d)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: --allow-mount %s: %w", smolvm.ErrInvalid, d, err)
		}
		if st, err := os.Stat(r); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("%w: --allow-mount %s is not a folder", smolvm.ErrInvalid, d)
		}
		out = append(out, filepath.Clean(r))
	}
	return out, nil
}

// mounts turns a create body's mounts into the library's: every host path
// is absolute and, once its symbolic links are resolved, lies inside a
// folder of the allowlist (the resolved path is what the VM gets). Any
// mount without an allowlist is refused. The library then checks the
// guest paths and the folders themselves (smolvm.Mount).
func (s *Server) mounts(in []mountJSON) ([]smolvm.Mount, error) {
	if len(in) == 0 {
		return nil, nil
	}
	if len(s.allowMounts) == 0 {
		return nil, fmt.Errorf("%w: this server allows no host folders (mounts): start it with 'smolvm serve --allow-mount DIR' to allow the folders under DIR", smolvm.ErrInvalid)
	}
	if len(in) > smolvm.MaxMounts {
		return nil, fmt.Errorf("%w: %d mounts: at most %d", smolvm.ErrInvalid, len(in), smolvm.MaxMounts)
	}
	out := make([]smolvm.Mount, 0, len(in))
	for _, m := range in {
		if !filepath.IsAbs(m.HostPath) {
			return nil, fmt.Errorf("%w: mount host_path %q: give an absolute path of the server's host", smolvm.ErrInvalid, m.HostPath)
		}
		real, err := filepath.EvalSymlinks(m.HostPath)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: mount host_path %s does not exist on the server's host", smolvm.ErrInvalid, m.HostPath)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: mount host_path %s: %s", smolvm.ErrInvalid, m.HostPath, err.Error())
		}
		real = filepath.Clean(real)
		within := s.mountAllowed(real)
		if within == "" {
			return nil, fmt.Errorf("%w: mount host_path %s (%s once its links are followed) is outside the folders this server allows (%s): mount a folder under them, or start the server with --allow-mount for it",
				smolvm.ErrInvalid, m.HostPath, real, strings.Join(s.allowMounts, ", "))
		}
		ro := m.ReadOnly == nil || *m.ReadOnly
		// Within: the library checks again, and opens the folder from
		// the allowed one without following links when it binds it,
		// so that a folder swapped for a link after this check (by
		// anyone who can write there, a sandbox too) is refused.
		out = append(out, smolvm.Mount{HostPath: real, GuestPath: m.GuestPath, ReadOnly: ro, Within: within})
	}
	if afterMountCheck != nil {
		afterMountCheck(out)
	}
	return out, nil
}

// afterMountCheck, when set (by tests), runs once mounts has checked a
// create body's mounts.
var afterMountCheck func([]smolvm.Mount)

// mountAllowed returns the allowed folder that the resolved path p is or
// lies under, or "".
func (s *Server) mountAllowed(p string) string {
	for _, d := range s.allowMounts {
		if p == d || strings.HasPrefix(p, strings.TrimSuffix(d, "/")+"/") {
			return d
		}
	}
	return ""
}
