package jail

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
)

// IDRange is a range of host ids: Start, Start+1, …, Start+Count-1.
type IDRange struct{ Start, Count uint32 }

// Holds tells whether id is in r.
func (r IDRange) Holds(id uint32) bool {
	return id >= r.Start && uint64(id) < uint64(r.Start)+uint64(r.Count)
}

// The files that list each user's subordinate ids (shadow-utils'
// subuid(5) and subgid(5)); variables for tests.
var (
	subUIDFile = "/etc/subuid"
	subGIDFile = "/etc/subgid"
)

// subIDSize is the size of the range EnsureUser gives User, as useradd
// gives a login user (ids 0 to 65535 of a namespace).
const subIDSize = 65536

// SubIDs returns the subordinate uids and gids that a user namespace of
// the host user uid may map besides uid itself: the first range that
// /etc/subuid and /etc/subgid give that user (by name or number), else
// the first they give User (which `smolvm setup` adds). ok is false when
// neither has both.
func SubIDs(uid uint32) (uids, gids IDRange, ok bool) {
	names := []string{strconv.FormatUint(uint64(uid), 10)}
	if u, err := user.LookupId(names[0]); err == nil {
		names = append(names, u.Username)
	}
	if u, err := user.Lookup(User); err == nil {
		names = append(names, u.Username, u.Uid)
	}
	for _, name := range names {
		uids, uok := firstRange(subUIDFile, name)
		gids, gok := firstRange(subGIDFile, name)
		if uok && gok {
			return uids, gids, true
		}
	}
	return IDRange{}, IDRange{}, false
}

// firstRange is the first range file gives name ("name:start:count"
// lines), if any.
func firstRange(file, name string) (IDRange, bool) {
	rs, _ := readRanges(file)
	for _, r := range rs {
		if r.name == name {
			return r.IDRange, true
		}
	}
	return IDRange{}, false
}

type namedRange struct {
	name string
	IDRange
}

// readRanges reads a subuid(5) file; lines it cannot read are skipped.
func readRanges(file string) ([]namedRange, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []namedRange
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(parts) != 3 || parts[0] == "" || strings.HasPrefix(parts[0], "#") {
			continue
		}
		start, err1 := strconv.ParseUint(parts[1], 10, 32)
		count, err2 := strconv.ParseUint(parts[2], 10, 32)
		if err1 != nil || err2 != nil || count == 0 || start+count > 1<<32-1 {
			continue
		}
		out = append(out, namedRange{parts[0], IDRange{uint32(start), uint32(count)}})
	}
	return out, sc.Err()
}

// subIDRanges is how many ranges EnsureUser gives User: the first maps
// a guest's users in host folders (SubIDs), the second gives each jailed
// QEMU ids of its own (reservedIDs).
const subIDRanges = 2

// userRanges are User's ranges in a subuid(5) file, in order (by name or
// by uid).
func userRanges(file string) []IDRange {
	names := map[string]bool{User: true}
	if u, err := user.Lookup(User); err == nil {
		names[u.Uid] = true
	}
	rs, _ := readRanges(file)
	var out []IDRange
	for _, r := range rs {
		if names[r.name] {
			out = append(out, r.IDRange)
		}
	}
	return out
}

// ensureSubIDs gives User subIDRanges ranges of subordinate uids and gids
// when /etc/subuid or /etc/subgid has fewer: each the first 65536 ids
// from 100000 on, in steps of 65536, that no range of either file and no
// user or group of the host holds, the same in both files (usermod
// --add-subuids, --add-subgids).
func ensureSubIDs() error {
	u, err := user.Lookup(User)
	if err != nil {
		return fmt.Errorf("subordinate ids: %w", err)
	}
	for {
		nu, ng := len(userRanges(subUIDFile)), len(userRanges(subGIDFile))
		if nu >= subIDRanges && ng >= subIDRanges {
			return nil
		}
		var taken []IDRange
		for _, file := range []string{subUIDFile, subGIDFile} {
			rs, err := readRanges(file)
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("subordinate ids: %w", err)
			}
			for _, r := range rs {
				taken = append(taken, r.IDRange)
			}
			// usermod refuses to add ranges to a file that does not exist.
			f, err := os.OpenFile(file, os.O_CREATE|os.O_RDONLY, 0o644)
			if err != nil {
				return fmt.Errorf("subordinate ids: %w", err)
			}
			f.Close()
		}
		for _, file := range []string{"/etc/passwd", "/etc/group"} {
			taken = append(taken, idsIn(file)...)
		}
		start, ok := freeRange(taken)
		if !ok {
			return fmt.Errorf("subordinate ids: no free range of %d ids for user %s in %s", subIDSize, User, subUIDFile)
		}
		r := fmt.Sprintf("%d-%d", start, start+subIDSize-1)
		var args []string
		if nu < subIDRanges {
			args = append(args, "--add-subuids", r)
		}
		if ng < subIDRanges {
			args = append(args, "--add-subgids", r)
		}
		out, err := exec.Command("usermod", append(args, u.Username)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("give user %s subordinate ids %s: %w: %s", User, r, err, strings.TrimSpace(string(out)))
		}
	}
}

// idsIn are the ids (third field) of a passwd(5) or group(5) file.
func idsIn(file string) []IDRange {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil
	}
	var out []IDRange
	for _, line := range strings.Split(string(b), "\n") {
		if parts := strings.Split(line, ":"); len(parts) > 2 {
			if id, err := strconv.ParseUint(parts[2], 10, 32); err == nil {
				out = append(out, IDRange{uint32(id), 1})
			}
		}
	}
	return out
}

// freeRange is the first start from 100000 on, in steps of subIDSize,
// whose subIDSize ids overlap none of taken.
func freeRange(taken []IDRange) (uint32, bool) {
	for start := uint64(100000); start+subIDSize <= 1<<32-1; start += subIDSize {
		free := true
		for _, t := range taken {
			if uint64(t.Start) < start+subIDSize && start < uint64(t.Start)+uint64(t.Count) {
				free = false
				break
			}
		}
		if free {
			return uint32(start), true
		}
	}
	return 0, false
}
