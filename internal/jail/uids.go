package jail

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// IDRange is the range of host uids and gids reserved for User in
// /etc/subuid and /etc/subgid (the same numbers in both): each jailed
// process gets one of its own, as Firecracker's jailer gives each VM its
// own uid, so that no QEMU can open another's files even past its mount
// namespace.
type IDRange struct{ Start, Count uint32 }

// idCount is how many ids setup reserves.
const idCount = 65536

// UIDDir records which folder holds which id of the range (root only; a
// tmpfs: after a reboot no process holds one, and a folder's next start
// allocates again).
const UIDDir = "/run/smolvm/uids"

// reservedIDs reads User's range from /etc/subuid and /etc/subgid: the
// ids both reserve, starting at the same number.
func reservedIDs() (IDRange, error) {
	u, err := subIDs("/etc/subuid")
	if err != nil {
		return IDRange{}, err
	}
	g, err := subIDs("/etc/subgid")
	if err != nil {
		return IDRange{}, err
	}
	if u.Start != g.Start || u.Count == 0 || g.Count == 0 {
		return IDRange{}, fmt.Errorf("no range of ids reserved for user %s in both /etc/subuid and /etc/subgid at the same start: run 'smolvm setup'", User)
	}
	return IDRange{Start: u.Start, Count: min(u.Count, g.Count)}, nil
}

// subIDEntry is a line of /etc/subuid or /etc/subgid.
type subIDEntry struct {
	user         string
	start, count uint64
}

// subIDEntries reads the well-formed lines of a subordinate id file (none
// when it does not exist).
func subIDEntries(path string) ([]subIDEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var out []subIDEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(f) != 3 {
			continue
		}
		start, err1 := strconv.ParseUint(f[1], 10, 32)
		count, err2 := strconv.ParseUint(f[2], 10, 32)
		if err1 == nil && err2 == nil {
			out = append(out, subIDEntry{f[0], start, count})
		}
	}
	return out, nil
}

// subIDs is User's first usable entry in a subordinate id file.
func subIDs(path string) (IDRange, error) {
	ents, err := subIDEntries(path)
	for _, e := range ents {
		if e.user == User && e.start > 0 && e.start+e.count <= 1<<31 {
			return IDRange{Start: uint32(e.start), Count: uint32(e.count)}, nil
		}
	}
	return IDRange{}, err
}

// EnsureIDs reserves idCount uids and gids for User (root only) when
// /etc/subuid and /etc/subgid have no common range for it: after every
// range they hold.
func EnsureIDs() error {
	if _, err := reservedIDs(); err == nil {
		return nil
	}
	end := uint64(100000)
	for _, p := range []string{"/etc/subuid", "/etc/subgid"} {
		ents, err := subIDEntries(p)
		if err != nil {
			return fmt.Errorf("reserve ids for user %s: %w", User, err)
		}
		for _, e := range ents {
			end = max(end, e.start+e.count)
		}
	}
	ids := fmt.Sprintf("%d-%d", end, end+idCount-1)
	out, err := exec.Command("usermod", "--add-subuids", ids, "--add-subgids", ids, User).CombinedOutput()
	if err != nil {
		return fmt.Errorf("reserve ids %s for user %s: %w: %s", ids, User, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Alloc gives the folder dir an id of r for its jailed process (uid and
// gid): the one it holds already, else the first that no folder and no
// live process holds. Ids are host-wide (one record for every state
// folder), allocated under a lock.
func (r IDRange) Alloc(dir string) (uint32, error) {
	unlock, err := lockUIDs()
	if err != nil {
		return 0, err
	}
	defer unlock()
	ents, err := os.ReadDir(UIDDir)
	if err != nil {
		return 0, fmt.Errorf("jail: %w", err)
	}
	taken := map[uint32]string{}
	for _, e := range ents {
		n, err := strconv.ParseUint(e.Name(), 10, 32)
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(UIDDir, e.Name()))
		if err != nil {
			continue
		}
		if string(b) == dir {
			return uint32(n), nil
		}
		taken[uint32(n)] = string(b)
	}
	// An id never recorded is free (entries are not removed, and /run
	// starts empty); a recorded one whose folder is gone is free unless a
	// process still runs as it (a prelaunched QEMU whose folder became a
	// VM's), which only then costs a walk of /proc.
	var live map[uint32]bool
	for i := uint32(0); i < r.Count; i++ {
		id := r.Start + i
		if owner, ok := taken[id]; ok {
			if folderExists(owner) {
				continue
			}
			if live == nil {
				live = processUIDs()
			}
			if live[id] {
				continue
			}
		}
		if err := os.WriteFile(filepath.Join(UIDDir, strconv.FormatUint(uint64(id), 10)), []byte(dir), 0o600); err != nil {
			return 0, fmt.Errorf("jail: %w", err)
		}
		return id, nil
	}
	return 0, fmt.Errorf("jail: all %d ids reserved for user %s are held (reserve more in /etc/subuid and /etc/subgid)", r.Count, User)
}

// Held reports whether id is held: by a folder that still exists, or by
// a live process.
func (r IDRange) Held(id uint32) bool {
	b, err := os.ReadFile(filepath.Join(UIDDir, strconv.FormatUint(uint64(id), 10)))
	return err == nil && folderExists(string(b)) || processUIDs()[id]
}

func folderExists(dir string) bool {
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}

// lockUIDs takes the allocation lock (flock: it goes with a killed
// holder).
func lockUIDs() (func(), error) {
	if err := os.MkdirAll(UIDDir, 0o700); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(UIDDir, ".lock"), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	// Held for the milliseconds of an allocation: a holder stopped for
	// 30 s (SIGSTOP) fails this start instead of hanging it.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("jail: lock %s/.lock (held by a stopped smolvm process? 'fuser' names it): %w", UIDDir, err)
		}
	}
}

// processUIDs is the set of real uids of the host's live processes
// (zombies left out).
func processUIDs() map[uint32]bool {
	out := map[uint32]bool{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		// A zombie (exited, not yet reaped) holds no file.
		if i := bytes.Index(b, []byte("\nState:\t")); i >= 0 && i+8 < len(b) && (b[i+8] == 'Z' || b[i+8] == 'X') {
			continue
		}
		if i := bytes.Index(b, []byte("\nUid:")); i >= 0 {
			f := strings.Fields(string(b[i+5 : min(len(b), i+64)]))
			if len(f) > 0 {
				if n, err := strconv.ParseUint(f[0], 10, 32); err == nil {
					out[uint32(n)] = true
				}
			}
		}
	}
	return out
}
