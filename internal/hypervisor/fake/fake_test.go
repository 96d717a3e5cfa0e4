package fake_test

import (
	"os"
	"testing"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/hypervisor/fake"
	"github.com/smolvm/smolvm/internal/hypervisor/hypervistest"
)

func fixture() hypervistest.Fixture {
	return hypervistest.Fixture{
		Machine: func(t *testing.T, dir string) *hypervisor.MachineConfig {
			return &hypervisor.MachineConfig{ID: "contract", Dir: dir, Kernel: "vmlinux", VCPUs: 1, MemoryMiB: 256,
				Accel: hypervisor.AccelTCG, Channel: hypervisor.ChannelVirtioSerial}
		},
		BaseDisk: func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("base"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
	}
}

// TestContract: the fake keeps the contract it stands in for, with every
// capability and with none.
func TestContract(t *testing.T) {
	hypervistest.Contract(t, &fake.Driver{}, fixture())
}

func TestContractWithoutPowers(t *testing.T) {
	caps := fake.Capabilities()
	caps.Pause, caps.Snapshot, caps.Prelaunch, caps.MemoryFile, caps.OverlayFormat = false, false, false, false, ""
	hypervistest.Contract(t, &fake.Driver{Caps: &caps}, fixture())
}
