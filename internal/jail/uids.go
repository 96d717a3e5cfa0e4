package jail

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The jailed QEMUs' ids: each jailed process gets a uid and gid of its
// own, as Firecracker's jailer gives each VM its own uid, so that no QEMU
// can open another's files even past its mount namespace. They come from
// the second range /etc/subuid and /etc/subgid give User (the same numbers
// in both); the first maps a guest's users in host folders (SubIDs), so
// no QEMU ever holds an id that owns a guest user's files.

// UIDDir records which folder holds which id of the range (root only; a
// tmpfs: after a reboot no process holds one, and a folder's next start
// allocates again).
const UIDDir = "/run/smolvm/uids"

// reservedIDs reads the QEMUs' range: User's second range in both
// /etc/subuid and /etc/subgid, starting at the same number.
func reservedIDs() (IDRange, error) {
	u, g := userRanges(subUIDFile), userRanges(subGIDFile)
	if len(u) < 2 || len(g) < 2 || u[1].Start != g[1].Start {
		return IDRange{}, fmt.Errorf("no second range of ids reserved for user %s in both /etc/subuid and /etc/subgid at the same start (the first maps a guest's users in host folders, the second gives each QEMU ids of its own): run 'smolvm setup'", User)
	}
	return IDRange{Start: u[1].Start, Count: min(u[1].Count, g[1].Count)}, nil
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
	// An id never recorded is free (/run starts empty); a recorded one
	// whose folder is gone is free unless a process still runs as it (a
	// prelaunched QEMU whose folder became a VM's), which only then costs
	// a walk of /proc. That walk forgets every such free record at once,
	// so the next starts read and walk nothing for them (a deleted VM's
	// record stays until then: 500 of them made each start read them all
	// and walk /proc, 13-19 ms).
	if live := staleFree(r, taken); live != nil {
		for id := range live {
			_ = os.Remove(filepath.Join(UIDDir, strconv.FormatUint(uint64(id), 10)))
			delete(taken, id)
		}
	}
	for i := uint32(0); i < r.Count; i++ {
		id := r.Start + i
		if _, ok := taken[id]; ok {
			continue
		}
		if err := os.WriteFile(filepath.Join(UIDDir, strconv.FormatUint(uint64(id), 10)), []byte(dir), 0o600); err != nil {
			return 0, fmt.Errorf("jail: %w", err)
		}
		return id, nil
	}
	return 0, fmt.Errorf("jail: all %d ids reserved for user %s are held (reserve more in /etc/subuid and /etc/subgid)", r.Count, User)
}

// staleFree returns the recorded ids of r whose folder is gone and as
// which no process runs (nil when no record's folder is gone: no walk of
// /proc then).
func staleFree(r IDRange, taken map[uint32]string) map[uint32]bool {
	var gone []uint32
	for id, owner := range taken {
		if r.Holds(id) && !folderExists(owner) {
			gone = append(gone, id)
		}
	}
	if len(gone) == 0 {
		return nil
	}
	live := processUIDs()
	free := map[uint32]bool{}
	for _, id := range gone {
		if !live[id] {
			free[id] = true
		}
	}
	return free
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
