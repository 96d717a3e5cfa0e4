package smolvm

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/store"
)

// Environment variables that set the host's capacity (see Config.MaxVMs).
const (
	MaxVMsEnv       = "SMOLVM_MAX_VMS"
	MaxMemoryMiBEnv = "SMOLVM_MAX_MEMORY_MIB"
)

// VMsPerCPU is the default limit of VMs per host CPU. Under emulation
// every idle guest still costs its host CPU time (timer ticks, the
// agent's wakeups): 250 idle VMs on 2 cores made one exec take 6.7 s.
const VMsPerCPU = 32

// memoryReserveMiB is host memory the default limit keeps for the host
// itself (smolvm's processes, page cache, the rest of the machine).
const memoryReserveMiB = 1024

// DefaultCapacity is the limit of VMs and of guest memory (MiB) a host
// takes when neither Config nor the environment sets one: VMsPerCPU per
// CPU, and the host's memory less 1 GiB.
func DefaultCapacity() (maxVMs, maxMemoryMiB int) {
	maxVMs = VMsPerCPU * runtime.NumCPU()
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		total := int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
		maxMemoryMiB = max(total-memoryReserveMiB, total/2)
	}
	return maxVMs, maxMemoryMiB
}

// Capacity returns the limits a new VM of this process is checked
// against when its Config sets none: $SMOLVM_MAX_VMS and
// $SMOLVM_MAX_MEMORY_MIB, else DefaultCapacity; 0 is no limit. An
// unusable variable is the ErrInvalid that creating a VM would return.
func Capacity() (maxVMs, maxMemoryMiB int, err error) {
	c, err := (&Config{}).capacity()
	return c.MaxVMs, c.MaxMemoryMiB, err
}

// capacity resolves the limits of cfg: its fields, else the environment,
// else DefaultCapacity; -1 is no limit.
func (c *Config) capacity() (store.Capacity, error) {
	defVMs, defMem := DefaultCapacity()
	vms, err := limit(c.MaxVMs, MaxVMsEnv, defVMs)
	if err != nil {
		return store.Capacity{}, err
	}
	mem, err := limit(c.MaxMemoryMiB, MaxMemoryMiBEnv, defMem)
	return store.Capacity{MaxVMs: vms, MaxMemoryMiB: mem}, err
}

func limit(v int, env string, def int) (int, error) {
	if v == 0 {
		if s := os.Getenv(env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < -1 || n == 0 {
				return 0, fmt.Errorf("%w: %s=%q: want a positive number, or -1 for no limit", ErrInvalid, env, s)
			}
			v = n
		} else {
			v = def
		}
	}
	if v < 0 {
		return 0, nil
	}
	return v, nil
}

// capacityErr says which limit a refused VM hit and what to do.
func capacityErr(err error) error {
	var ce *store.CapacityError
	if !errors.As(err, &ce) {
		return err
	}
	what, env := "VMs", MaxVMsEnv
	if ce.Resource != "VMs" {
		what, env = "guest memory", MaxMemoryMiBEnv
	}
	return fmt.Errorf("%w (the limit of %s, Config or %s): delete one with 'smolvm rm' or raise the limit", err, what, env)
}
