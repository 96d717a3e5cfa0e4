package smolvm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sort"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/store"
)

// Environment variables that set the host's capacity (see Config.MaxVMs).
const (
	MaxVMsEnv       = "SMOLVM_MAX_VMS"
	MaxMemoryMiBEnv = "SMOLVM_MAX_MEMORY_MIB"
	// HostDirEnv names the host folder (see HostDir) in place of the
	// default.
	HostDirEnv = hostcap.DirEnv
)

// VMsPerCPU is the default limit of VMs per host CPU. Under emulation
// every idle guest still costs its host CPU time (timer ticks, the
// agent's wakeups): 250 idle VMs on 2 cores made one exec take 6.7 s.
const VMsPerCPU = 32

// memoryReserveMiB is host memory the default limit keeps for the host
// itself (smolvm's processes, page cache, the rest of the machine).
const memoryReserveMiB = 1024

// DefaultCapacity is the limit of VMs and of guest memory (MiB) a host
// takes when nothing sets one: VMsPerCPU per CPU, and the host's memory
// less 1 GiB.
func DefaultCapacity() (maxVMs, maxMemoryMiB int) {
	maxVMs = VMsPerCPU * runtime.NumCPU()
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		total := int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
		maxMemoryMiB = max(total-memoryReserveMiB, total/2)
	}
	return maxVMs, maxMemoryMiB
}

// HostDir is the host folder, where the limits of the whole host are
// counted and set: $SMOLVM_HOST_DIR, else /var/lib/smolvm for root, else
// smolvm in the user's config folder. Its capacity.json holds the limits
// that SetHostCapacity (smolvm setup --max-vms/--max-memory) sets.
func HostDir() string { return hostcap.Dir() }

// HostCapacity are the host's capacity settings (HostDir's
// capacity.json): 0 leaves a limit to the default, -1 is no limit.
type HostCapacity struct {
	MaxVMs       int `json:"max_vms,omitempty"`
	MaxMemoryMiB int `json:"max_memory_mib,omitempty"`
}

// ReadHostCapacity returns the host's capacity settings.
func ReadHostCapacity() (HostCapacity, error) {
	l, err := hostcap.ReadLimits(hostcap.Dir())
	return HostCapacity(l), err
}

// SetHostCapacity sets the limits every state folder of this host is
// checked against when neither Config nor the environment sets one.
func SetHostCapacity(c HostCapacity) error {
	return hostcap.WriteLimits(hostcap.Dir(), hostcap.Limits(c))
}

// Capacity returns the limits a new VM of this process is checked
// against when its Config sets none: $SMOLVM_MAX_VMS and
// $SMOLVM_MAX_MEMORY_MIB, else the host's settings (SetHostCapacity),
// else DefaultCapacity; 0 is no limit. An unusable variable or setting
// is the ErrInvalid that creating a VM would return.
func Capacity() (maxVMs, maxMemoryMiB int, err error) {
	c, err := (&Config{}).capacity()
	return c.MaxVMs, c.MaxMemoryMiB, err
}

// limits are the resolved limits of a new VM and where each came from.
type limits struct {
	store.Capacity
	vmsFrom, memFrom string
}

// capacity resolves the limits of cfg: its fields, else the environment,
// else the host's settings, else DefaultCapacity; -1 is no limit.
func (c *Config) capacity() (limits, error) {
	defVMs, defMem := DefaultCapacity()
	host, err := hostcap.ReadLimits(hostcap.Dir())
	if err != nil {
		return limits{}, err
	}
	var l limits
	l.MaxVMs, l.vmsFrom, err = limit(c.MaxVMs, "Config.MaxVMs or --max-vms", MaxVMsEnv, host.MaxVMs, "--max-vms N", defVMs,
		fmt.Sprintf("the default, %d per CPU", VMsPerCPU))
	if err != nil {
		return limits{}, err
	}
	l.MaxMemoryMiB, l.memFrom, err = limit(c.MaxMemoryMiB, "Config.MaxMemoryMiB or --max-memory", MaxMemoryMiBEnv, host.MaxMemoryMiB, "--max-memory SIZE", defMem,
		"the default, the host's memory less 1 GiB")
	return l, err
}

// limit resolves one limit (-1: none, returned as 0) and says where it
// came from.
func limit(v int, field, env string, host int, setupFlag string, def int, defFrom string) (int, string, error) {
	from := field
	switch {
	case v != 0:
	case os.Getenv(env) != "":
		s := os.Getenv(env)
		n, err := strconv.Atoi(s)
		if err != nil || n < -1 || n == 0 {
			return 0, "", fmt.Errorf("%w: %s=%q: want a positive number, or -1 for no limit", ErrInvalid, env, s)
		}
		v, from = n, "$"+env
	case host != 0:
		v, from = host, fmt.Sprintf("the host's setting in %s/%s ('smolvm setup %s')", hostcap.Dir(), hostcap.LimitsFile, setupFlag)
	default:
		v, from = def, defFrom
	}
	if v < 0 {
		return 0, from, nil
	}
	return v, from, nil
}

// within is the engine's capacity check of a VM of c in the state
// folder home (see withinCapacity) that claims no spare (a start): the
// spares it leaves no room for give way at once.
func (c *Config) within(home string) engine.Within {
	return func(ctx context.Context, write func(store.Capacity) error) error {
		return withinCapacity(ctx, home, c, write, true)
	}
}

// withinThenGiveWay is the capacity check of a VM of c that may claim a
// spare (a create): the spares give way only once it has or has not
// (giveWay), so that it never reclaims the one it would claim.
func (c *Config) withinThenGiveWay(home string) engine.Within {
	return func(ctx context.Context, write func(store.Capacity) error) error {
		return withinCapacity(ctx, home, c, write, false)
	}
}

// giveWay reclaims the spares the host's VMs leave no room for (a
// create's, once it claimed a spare or not).
func (c *Config) giveWay(home string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		if len(hostcap.SparesOn(hostcap.Dir(), home, engine.ProcessAlive)) == 0 {
			return nil // the usual case: no lock, no count of the VMs
		}
		lock, err := hostcap.Acquire(ctx, hostcap.Dir())
		if err != nil {
			return err
		}
		defer lock.Release()
		l, err := c.count(ctx, lock, home)
		if err == nil && (l.MaxVMs > 0 || l.MaxMemoryMiB > 0) {
			reclaimSpares(ctx, lock, home, l, 0, 0)
		}
		return err
	}
}

// spareRoom is the engine's capacity check of a prelaunched hypervisor
// started after a VM of c in the state folder home (see spareWithin).
func (c *Config) spareRoom(home string) engine.SpareRoom {
	return func(ctx context.Context, memMiB int, record func() error) error {
		return spareWithin(ctx, home, c, memMiB, record)
	}
}

// hostLock takes the host folder's lock for a create in state folder
// home, with the limits of cfg (Alive set) and what the host's other
// state folders' VMs hold.
func hostLock(ctx context.Context, home string, cfg *Config) (*hostcap.Lock, limits, error) {
	lock, err := hostcap.Acquire(ctx, hostcap.Dir())
	if err != nil {
		return nil, limits{}, err
	}
	// Registered before the count, so that a create elsewhere that waits
	// for this lock sees this VM.
	if err := lock.Register(home); err != nil {
		lock.Release()
		return nil, limits{}, err
	}
	l, err := cfg.count(ctx, lock, home)
	if err != nil {
		lock.Release()
		return nil, limits{}, err
	}
	return lock, l, nil
}

// count returns the limits of c (Alive set) and what the VMs of the
// host's state folders other than home hold, under lock.
func (c *Config) count(ctx context.Context, lock *hostcap.Lock, home string) (limits, error) {
	l, err := c.capacity()
	if err != nil {
		return limits{}, err
	}
	l.Alive = engine.ProcessAlive
	if l.MaxVMs > 0 || l.MaxMemoryMiB > 0 {
		other, _, err := lock.Others(ctx, home, engine.ProcessAlive)
		if err != nil {
			return limits{}, err
		}
		l.OtherVMs, l.OtherMemoryMiB = other.VMs, other.MemoryMiB
	}
	return l, nil
}

// withinCapacity runs write (the transaction that makes a VM hold host
// resources) under the host folder's lock, with the limits of cfg and
// what the host's other state folders hold: two creates in any folders
// of the host never pass a limit together. VMs whose supervisor is gone
// are not counted. Prelaunched hypervisors (spares) do not stop a VM:
// when the VM leaves too little room for them, as many as it takes are
// reclaimed (ended by the processes that made them), now with giveWay,
// else later (giveWay).
func withinCapacity(ctx context.Context, home string, cfg *Config, write func(store.Capacity) error, giveWay bool) error {
	lock, l, err := hostLock(ctx, home, cfg)
	if err != nil {
		return err
	}
	defer lock.Release()
	if err := l.explain(write(l.Capacity)); err != nil {
		return err
	}
	if giveWay && (l.MaxVMs > 0 || l.MaxMemoryMiB > 0) {
		reclaimSpares(ctx, lock, home, l, 0, 0)
	}
	return nil
}

// reclaimSpares takes spares off the count, this process's first, until
// the VMs that hold host resources, the spares left and vms VMs more of
// memMiB fit the limits l. It reports whether they fit.
func reclaimSpares(ctx context.Context, lock *hostcap.Lock, home string, l limits, vms, memMiB int) bool {
	spares := lock.Spares(home, engine.ProcessAlive)
	if len(spares) == 0 && vms == 0 {
		return true // write checked the VMs
	}
	own, err := store.Holding(ctx, home, engine.ProcessAlive)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		slog.Warn("host capacity: the state folder's VMs could not be counted to make room for them beside prelaunched hypervisors", "home", home, "err", err)
		return false
	}
	n, mem := own.VMs+l.OtherVMs+vms, own.MemoryMiB+l.OtherMemoryMiB+memMiB
	for _, s := range spares {
		n, mem = n+1, mem+s.MemoryMiB
	}
	over := func() bool { return l.MaxVMs > 0 && n > l.MaxVMs || l.MaxMemoryMiB > 0 && mem > l.MaxMemoryMiB }
	if vms > 0 {
		return !over() // a spare reclaims no other
	}
	sort.SliceStable(spares, func(i, j int) bool { return spares[i].Owner == os.Getpid() && spares[j].Owner != os.Getpid() })
	for _, s := range spares {
		if !over() {
			break
		}
		if lock.Reclaim(s) {
			slog.Debug("host capacity: a prelaunched hypervisor gives its room to a VM", "spare", s.Dir, "owner", s.Owner)
			if s.Owner == os.Getpid() {
				engine.ReclaimSpare(s.Dir)
			}
		}
		n, mem = n-1, mem-s.MemoryMiB
	}
	return !over()
}

// spareWithin runs record (which makes a prelaunched hypervisor of
// memMiB count) under the host folder's lock when the host has room for
// it with every VM and spare counted; else it fails with ErrCapacity.
func spareWithin(ctx context.Context, home string, cfg *Config, memMiB int, record func() error) error {
	lock, l, err := hostLock(ctx, home, cfg)
	if err != nil {
		return err
	}
	defer lock.Release()
	if (l.MaxVMs > 0 || l.MaxMemoryMiB > 0) && !reclaimSpares(ctx, lock, home, l, 1, memMiB) {
		return fmt.Errorf("%w: no room for a prelaunched hypervisor of %d MiB beside the host's VMs and spares (max %d VMs, %d MiB)", ErrCapacity, memMiB, l.MaxVMs, l.MaxMemoryMiB)
	}
	return record()
}

// explain says which limit a refused VM hit, where it was set and what
// to do.
func (l limits) explain(err error) error {
	var ce *store.CapacityError
	if !errors.As(err, &ce) {
		return err
	}
	from, set := l.vmsFrom, fmt.Sprintf("Config.MaxVMs, --max-vms, $%s, or 'smolvm setup --max-vms N' for the host", MaxVMsEnv)
	if ce.Resource != "VMs" {
		from, set = l.memFrom, fmt.Sprintf("Config.MaxMemoryMiB, --max-memory, $%s, or 'smolvm setup --max-memory SIZE' for the host", MaxMemoryMiBEnv)
	}
	return fmt.Errorf("%w; the limit comes from %s: delete a VM with 'smolvm rm' (in any state folder of the host), or raise the limit (%s)",
		err, from, set)
}
