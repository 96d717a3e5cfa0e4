// Package hostcap counts a host's capacity across its state folders.
//
// Each state folder keeps its VMs in its own database, but the host's
// limits of VMs and of guest memory are the host's: so every VM
// creation, in every state folder, takes the host folder's lock, reads
// what the VMs of the other state folders registered there hold, and
// writes its own VM's row before it lets the lock go. Two creates can
// then never both pass a limit, whichever folders they are in.
//
// The host folder (Dir) holds:
//
//	lock            flock(2)ed by a create while it checks and writes
//	homes/<hash>    one file per state folder whose VMs may hold host
//	                resources: its path
//	capacity.json   the host's limits (smolvm setup --max-vms/--max-memory)
//
// and each state folder's prelaunched hypervisors have a record in their
// folders there (see Spare).
//
// A state folder registers itself at each create; one found holding
// nothing leaves the registry (its next create registers it again), and
// so does one that no longer exists. Nothing there needs cleaning after
// a crash: the lock goes with its holder, and a VM whose supervisor
// process is gone is not counted.
package hostcap

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/store"
)

// DirEnv names the host folder in place of the default.
const DirEnv = "SMOLVM_HOST_DIR"

// RootDir is the host folder of root.
const RootDir = "/var/lib/smolvm"

// LimitsFile is the file of the host's limits in the host folder.
const LimitsFile = "capacity.json"

// lockTimeout bounds the wait for another create's lock (held for the
// milliseconds of a count and an insert).
const lockTimeout = 30 * time.Second

// maxHomes bounds the registry read (each entry is one database to open).
const maxHomes = 4096

// Dir is the host folder: $SMOLVM_HOST_DIR, else RootDir for root, else
// smolvm in the user's config folder (a user other than root counts the
// VMs of its own state folders: it can read no one else's).
func Dir() string {
	if d := os.Getenv(DirEnv); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return RootDir
	}
	if d, err := os.UserConfigDir(); err == nil {
		return filepath.Join(d, "smolvm")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("smolvm-host-%d", os.Geteuid()))
}

// ensureDir makes the host folder dir and checks that only this user can
// change what is in it.
func ensureDir(dir string) error {
	if err := os.MkdirAll(filepath.Join(dir, "homes"), 0o700); err != nil {
		return fmt.Errorf("host folder: %w (set %s to a writable folder)", err, DirEnv)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("host folder: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != os.Geteuid() || st.Mode&0o022 != 0 {
		return fmt.Errorf("%w: host folder %s must be a folder of uid %d that no one else can write (uid %d, mode %o): set %s to a folder of your own",
			errdefs.ErrInvalid, dir, os.Geteuid(), st.Uid, st.Mode&0o7777, DirEnv)
	}
	return nil
}

// Lock is the host folder's lock, held.
type Lock struct {
	dir string
	f   *os.File
}

// Acquire takes the lock of host folder dir (making the folder), waiting
// for another holder until ctx ends or 30 s have passed.
func Acquire(ctx context.Context, dir string) (*Lock, error) {
	if err := ensureDir(dir); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("host capacity lock: %w", err)
	}
	deadline := time.Now().Add(lockTimeout)
	wait := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &Lock{dir: dir, f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("host capacity lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w: host capacity lock %s held by another smolvm process for %s (a process stopped while creating a VM? 'fuser %s' names it)",
				errdefs.ErrUnavailable, path, lockTimeout, path)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for host capacity lock %s: %w", path, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 20*time.Millisecond)
	}
}

// Release lets the lock go.
func (l *Lock) Release() { _ = l.f.Close() } // closing the last fd drops the flock

// key names a state folder's registry entry: the same folder by any
// path gets the same key.
func key(home string) (string, string) {
	if abs, err := filepath.Abs(home); err == nil {
		home = abs
	}
	if real, err := filepath.EvalSymlinks(home); err == nil {
		home = real
	}
	sum := sha256.Sum256([]byte(home))
	return hex.EncodeToString(sum[:12]), home
}

// Register records state folder home in the registry.
func (l *Lock) Register(home string) error {
	k, abs := key(home)
	p := filepath.Join(l.dir, "homes", k)
	if b, err := os.ReadFile(p); err == nil && string(b) == abs {
		return nil
	}
	if err := os.WriteFile(p, []byte(abs), 0o600); err != nil {
		return fmt.Errorf("register state folder in the host folder: %w", err)
	}
	return nil
}

// Others returns what the VMs of the registered state folders other
// than home hold (with alive: only those whose supervisor lives), and
// how many folders hold something. Folders that hold nothing, or are
// gone, leave the registry; one whose database cannot be read is logged
// and not counted.
func (l *Lock) Others(ctx context.Context, home string, alive func(pid int) bool) (store.Usage, int, error) {
	self, _ := key(home)
	return usage(ctx, l.dir, self, alive, true)
}

// Usage is what every registered state folder's VMs hold, and how many
// folders hold something, read without the lock (for doctor).
func Usage(ctx context.Context, dir string, alive func(pid int) bool) (store.Usage, int, error) {
	return usage(ctx, dir, "", alive, false)
}

func usage(ctx context.Context, dir, self string, alive func(pid int) bool, prune bool) (store.Usage, int, error) {
	ents, err := os.ReadDir(filepath.Join(dir, "homes"))
	if errors.Is(err, os.ErrNotExist) {
		return store.Usage{}, 0, nil
	}
	if err != nil {
		return store.Usage{}, 0, fmt.Errorf("read the host folder's registry: %w", err)
	}
	if len(ents) > maxHomes {
		ents = ents[:maxHomes]
	}
	var total store.Usage
	homes := 0
	for _, e := range ents {
		if e.Name() == self || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(dir, "homes", e.Name())
		b, err := os.ReadFile(p)
		if err != nil || len(b) > 4096 {
			continue
		}
		u, err := store.Holding(ctx, string(b), alive)
		switch {
		case (errors.Is(err, os.ErrNotExist) || err == nil && u.VMs == 0) && len(spares(string(b), alive)) == 0:
			if prune {
				_ = os.Remove(p)
			}
		case errors.Is(err, os.ErrNotExist) || err == nil && u.VMs == 0:
			// Only spares: Spares counts them.
		case err != nil:
			if ctx.Err() != nil {
				return store.Usage{}, 0, ctx.Err()
			}
			slog.Warn("host capacity: a state folder's VMs are not counted", "home", string(b), "err", err)
		default:
			total.VMs += u.VMs
			total.MemoryMiB += u.MemoryMiB
			homes++
		}
	}
	return total, homes, nil
}

// Limits are the host's capacity settings: 0 leaves a limit to the
// default, -1 is no limit.
type Limits struct {
	MaxVMs       int `json:"max_vms,omitempty"`
	MaxMemoryMiB int `json:"max_memory_mib,omitempty"`
}

// ReadLimits reads the host's limits from host folder dir (none set when
// it has no LimitsFile).
func ReadLimits(dir string) (Limits, error) {
	var l Limits
	path := filepath.Join(dir, LimitsFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return l, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &l)
	}
	if err == nil && (l.MaxVMs < -1 || l.MaxMemoryMiB < -1) {
		err = errors.New("a limit below -1")
	}
	if err != nil {
		return Limits{}, fmt.Errorf("%w: host capacity settings %s: %v (set them again with 'smolvm setup --max-vms N --max-memory SIZE')", errdefs.ErrInvalid, path, err)
	}
	return l, nil
}

// WriteLimits replaces the host's limits in host folder dir (making it);
// zero Limits remove the file.
func WriteLimits(dir string, l Limits) error {
	if l.MaxVMs < -1 || l.MaxMemoryMiB < -1 {
		return fmt.Errorf("%w: capacity limits %+v: want a positive number, 0 for the default or -1 for no limit", errdefs.ErrInvalid, l)
	}
	if err := ensureDir(dir); err != nil {
		return err
	}
	path := filepath.Join(dir, LimitsFile)
	if l == (Limits{}) {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("host capacity settings: %w", err)
		}
		return nil
	}
	b, _ := json.Marshal(l)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("host capacity settings: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("host capacity settings: %w", err)
	}
	return nil
}

// Prelaunched hypervisors (spares) hold host memory before any VM has
// them, so they count: each has a record, SpareFile in its folder under
// the state folder's SparesDir, made under the lock before its process
// starts, and it counts while the record is there and its owner process
// lives. A spare never stops a VM: a create that passes a limit only with
// the spares counted reclaims them (Reclaim removes the record; the owner
// ends an unclaimed spare whose record is gone). A spare that a VM
// claims leaves SparesDir with its folder: the VM's row counts it then.

// SparesDir is the folder of state folder home's spares.
func SparesDir(home string) string { return filepath.Join(home, "spares") }

// SpareFile is a spare's record in its folder.
const SpareFile = "capacity"

// Spare is a spare's record.
type Spare struct {
	Dir       string `json:"-"`
	Owner     int    `json:"owner"` // the process that made it and may claim it
	MemoryMiB int    `json:"memory_mib"`
}

// RecordSpare makes the record of a spare of this process in folder dir
// (made), holding memMiB of guest memory. Call it under the lock, once
// the limits allow it.
func RecordSpare(dir string, memMiB int) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("record a prelaunched hypervisor: %w", err)
	}
	b, _ := json.Marshal(Spare{Owner: os.Getpid(), MemoryMiB: memMiB})
	if err := os.WriteFile(filepath.Join(dir, SpareFile), b, 0o600); err != nil {
		return fmt.Errorf("record a prelaunched hypervisor: %w", err)
	}
	return nil
}

// SpareRecorded reports whether the spare in dir still counts (no create
// reclaimed it).
func SpareRecorded(dir string) bool {
	_, err := os.Lstat(filepath.Join(dir, SpareFile))
	return err == nil
}

// Reclaim takes spare s off the count (under the lock): its owner ends
// it, unless a VM claims it first (then the VM's row counts it). It
// reports whether the record was there.
func (l *Lock) Reclaim(s Spare) bool {
	return os.Remove(filepath.Join(s.Dir, SpareFile)) == nil
}

// spares returns the spares of state folder home whose owner lives.
func spares(home string, alive func(pid int) bool) []Spare {
	dir := SparesDir(home)
	ents, _ := os.ReadDir(dir)
	var out []Spare
	for _, e := range ents {
		if len(out) >= maxHomes {
			break
		}
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(filepath.Join(p, SpareFile))
		var s Spare
		if err != nil || len(b) > 4096 || json.Unmarshal(b, &s) != nil || s.Owner <= 0 || s.MemoryMiB < 0 {
			continue
		}
		if alive != nil && !alive(s.Owner) {
			continue // gone with its owner; cleanup removes the folder
		}
		s.Dir = p
		out = append(out, s)
	}
	return out
}

// Spares returns the spares on the host that count: those of home and
// of every registered state folder.
func (l *Lock) Spares(home string, alive func(pid int) bool) []Spare {
	return SparesOn(l.dir, home, alive)
}

// SparesOn is Spares of host folder dir read without its lock: a create
// whose VM is recorded learns that no spare has to give way to it (a
// spare recorded after it counted that VM).
func SparesOn(dir, home string, alive func(pid int) bool) []Spare {
	self, abs := key(home)
	out := spares(abs, alive)
	ents, _ := os.ReadDir(filepath.Join(dir, "homes"))
	if len(ents) > maxHomes {
		ents = ents[:maxHomes]
	}
	for _, e := range ents {
		if e.Name() == self || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, "homes", e.Name()))
		if err != nil || len(b) > 4096 {
			continue
		}
		out = append(out, spares(string(b), alive)...)
	}
	return out
}
