package main

import (
	"fmt"

	"github.com/spf13/pflag"

	"github.com/smolvm/smolvm"
)

// capacityFlags are --max-vms and --max-memory: the host's limits, for
// one create (run, create) or kept for the host (setup).
type capacityFlags struct {
	vms    int
	memory string
}

func (f *capacityFlags) register(fs *pflag.FlagSet, scope string) {
	fs.IntVar(&f.vms, "max-vms", 0, "refuse "+scope+" past this many VMs on the host, in every state folder (-1: no limit; default $"+smolvm.MaxVMsEnv+", else 'smolvm setup --max-vms', else 32 per CPU)")
	fs.StringVar(&f.memory, "max-memory", "", "refuse "+scope+" past this much guest memory on the host, e.g. 16G (-1: no limit; default $"+smolvm.MaxMemoryMiBEnv+", else 'smolvm setup --max-memory', else the host's memory less 1 GiB)")
}

// limits returns the flags' limits (0: not set, -1: none).
func (f *capacityFlags) limits() (vms, memMiB int, err error) {
	if f.vms < -1 {
		return 0, 0, fmt.Errorf("%w: --max-vms %d: want a positive number, or -1 for no limit", smolvm.ErrInvalid, f.vms)
	}
	if f.memory == "-1" {
		return f.vms, -1, nil
	}
	memMiB, err = smolvm.ParseSizeMiB(f.memory)
	if err != nil {
		return 0, 0, fmt.Errorf("--max-memory: %w", err)
	}
	return f.vms, memMiB, nil
}
