package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
	"github.com/smolvm/smolvm/internal/wire"
)

// loadImageConfig reads the image's run config; a missing file is none.
// A file that cannot be read or parsed is kept as an error that every
// command reports, so the user learns of it at the first command.
func loadImageConfig(path string) (*wire.ImageConfig, error) {
	data, err := readGuestFile(path, wire.MaxImageConfigSize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return wire.ParseImageConfig(data)
}

// readGuestFile reads a regular file of the guest's of at most max bytes:
// whatever guest root puts at path (a device, a FIFO, a huge file), the
// agent neither blocks nor reads without bound.
func readGuestFile(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("read %s: not a regular file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("%s: more than %d bytes", path, max)
	}
	return data, nil
}

// identity is a resolved user: who a command runs as.
type identity struct {
	uid, gid uint32
	groups   []uint32
	home     string // from /etc/passwd; "" when the user has no entry
}

// Users and groups files, variables for tests.
var (
	passwdFile = "/etc/passwd"
	groupFile  = "/etc/group"
)

// maxAccountsFile bounds /etc/passwd and /etc/group as read here.
const maxAccountsFile = 4 << 20

// resolveUser resolves spec (name, uid, name:group, uid:gid, uid:group,
// name:gid) the way container runtimes do: a name must exist in
// /etc/passwd (a group name in /etc/group); a numeric uid need not, and
// then runs with gid 0 unless a group is given. The user's supplementary
// groups come from /etc/group.
func resolveUser(spec string) (*identity, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" || hasGroup && groupPart == "" {
		return nil, fmt.Errorf("user %q: want NAME, UID, NAME:GROUP or UID:GID", spec)
	}
	passwd, err := readAccounts(passwdFile)
	if err != nil {
		return nil, err
	}
	id := &identity{}
	var name string
	found := false
	uid, numeric := parseID(userPart)
	for _, f := range passwd {
		if len(f) < 7 {
			continue
		}
		if numeric && f[2] == userPart || !numeric && f[0] == userPart {
			u, ok1 := parseID(f[2])
			g, ok2 := parseID(f[3])
			if !ok1 || !ok2 {
				continue
			}
			id.uid, id.gid, id.home, name, found = u, g, f[5], f[0], true
			break
		}
	}
	switch {
	case found:
	case numeric:
		id.uid, id.gid = uid, 0
	default:
		return nil, fmt.Errorf("user %q does not exist in the guest's %s", userPart, passwdFile)
	}
	var groups [][]string
	if hasGroup || name != "" {
		if groups, err = readAccounts(groupFile); err != nil && hasGroup {
			return nil, err
		}
	}
	if hasGroup {
		gid, numericG := parseID(groupPart)
		if !numericG {
			ok := false
			for _, f := range groups {
				if len(f) >= 3 && f[0] == groupPart {
					gid, ok = parseID(f[2])
					break
				}
			}
			if !ok {
				return nil, fmt.Errorf("group %q does not exist in the guest's %s", groupPart, groupFile)
			}
		}
		id.gid = gid
	}
	if name != "" {
		for _, f := range groups {
			if len(f) < 4 || f[3] == "" {
				continue
			}
			for _, member := range strings.Split(f[3], ",") {
				if member == name {
					if g, ok := parseID(f[2]); ok && g != id.gid {
						id.groups = append(id.groups, g)
					}
					break
				}
			}
		}
	}
	return id, nil
}

func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err == nil
}

// readAccounts reads a colon-separated accounts file (passwd, group).
func readAccounts(path string) ([][]string, error) {
	data, err := readGuestFile(path, maxAccountsFile)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("the guest has no %s", path)
		}
		return nil, err
	}
	var out [][]string
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), maxAccountsFile)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out, sc.Err()
}

// identity picks who a command runs as and where: the request's user, else
// the image's User, else root (nil: the agent's own identity); the
// request's folder, else the image's WorkingDir, else the user's home (for
// root, the agent's default folder). A broken image config is an error
// naming the image and the field.
func (s *Server) identity(start *agentpb.ExecStart) (*identity, string, error) {
	if s.imageErr != nil {
		return nil, "", &startError{126, fmt.Errorf("the image's run config is unusable: %w", s.imageErr)}
	}
	img := s.image
	if img == nil {
		img = &wire.ImageConfig{}
	}
	spec, field := start.GetUser(), ""
	if spec == "" && img.User != "" {
		spec, field = img.User, "User"
	}
	var id *identity
	if spec != "" {
		var err error
		if id, err = resolveUser(spec); err != nil {
			return nil, "", &startError{126, imageFieldError(img, field, err)}
		}
		if id.uid == 0 && id.gid == 0 && len(id.groups) == 0 {
			id = nil // root, as the agent runs: no credential switch
		}
	}
	dir := start.GetDir()
	switch {
	case dir != "":
	case img.WorkingDir != "":
		dir = img.WorkingDir
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return nil, "", &startError{126, imageFieldError(img, "WorkingDir", fmt.Errorf("folder %s does not exist in the guest", dir))}
		}
	case id != nil && id.home != "":
		if fi, err := os.Stat(id.home); err == nil && fi.IsDir() {
			dir = id.home
		} else {
			dir = "/"
		}
	case id != nil:
		dir = "/"
	default:
		dir = s.cfg.DefaultDir
	}
	return id, dir, nil
}

// imageFieldError names the image and the config field an error comes
// from (field "" when the request, not the image, named the value).
func imageFieldError(img *wire.ImageConfig, field string, err error) error {
	if field == "" {
		return err
	}
	name := img.Image
	if name == "" {
		name = "(unnamed)"
	}
	return fmt.Errorf("image %s: config %s: %w (fix the image's config, or override it: --user/--workdir, WithUser/WithDir)", name, field, err)
}
