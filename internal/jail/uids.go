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

// IDFile in a folder names the id Alloc gave it, so that ReleaseID frees
// it when the folder goes (a VM's deletion) and not only at a later
// allocation that finds the folder gone. It moves with the folder (a
// prelaunched QEMU's folder that becomes a VM's).
const IDFile = "jail-id"

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
			return uint32(n), writeIDFile(dir, uint32(n))
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
		rec := filepath.Join(UIDDir, strconv.FormatUint(uint64(id), 10))
		if err := os.WriteFile(rec, []byte(dir), 0o600); err != nil {
			return 0, fmt.Errorf("jail: %w", err)
		}
		if err := writeIDFile(dir, id); err != nil {
			_ = os.Remove(rec)
			return 0, err
		}
		return id, nil
	}
	return 0, fmt.Errorf("jail: all %d ids reserved for user %s are held (reserve more in /etc/subuid and /etc/subgid)", r.Count, User)
}

// writeIDFile records in dir the id it holds (see IDFile).
func writeIDFile(dir string, id uint32) error {
	p := filepath.Join(dir, IDFile)
	if b, err := readOwnRecord(p); err == nil && string(b) == strconv.FormatUint(uint64(id), 10) {
		return nil
	}
	// A file there of someone else's (the jailed process may write in
	// dir) is replaced, not written through.
	_ = os.Remove(p)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err == nil {
		_, err = f.WriteString(strconv.FormatUint(uint64(id), 10))
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		return fmt.Errorf("jail: record the id of %s: %w", dir, err)
	}
	return nil
}

// ReleaseID frees the id that Alloc gave folder dir, which is going
// (a deleted VM's folder, before it is removed): its record is removed
// unless a process still runs as the id (then the next allocation that
// finds the folder gone frees it), or the record is another folder's.
// A folder that holds no id (never jailed, or not root) costs one
// failed open.
func ReleaseID(dir string) error {
	b, err := readOwnRecord(filepath.Join(dir, IDFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	id, err := strconv.ParseUint(string(b), 10, 32)
	if err != nil {
		return fmt.Errorf("jail: %s/%s: %w", dir, IDFile, err)
	}
	unlock, err := lockUIDs()
	if err != nil {
		return err
	}
	defer unlock()
	rec := filepath.Join(UIDDir, strconv.FormatUint(id, 10))
	owner, err := os.ReadFile(rec)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("jail: %w", err)
	// The record names dir, or the folder dir was made as (a spare's,
	// renamed): anything else is another folder's now.
	case string(owner) != dir && folderExists(string(owner)):
	case processUIDs()[uint32(id)]:
		// Its process is ending (killed, not yet reaped): the next
		// allocation frees the id once it is gone.
	default:
		if err := os.Remove(rec); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("jail: %w", err)
		}
	}
	if err := os.Remove(filepath.Join(dir, IDFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("jail: %w", err)
	}
	return nil
}

// ReleaseFolder lets go of what jailed processes of folder dir held
// once they are gone: its recorded cgroup (RemoveRecordedCgroup) and its
// id (ReleaseID). Call it before dir is removed.
func ReleaseFolder(dir string) error {
	return errors.Join(RemoveRecordedCgroup(dir), ReleaseID(dir))
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
