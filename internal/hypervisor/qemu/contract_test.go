package qemu_test

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/hypervisor/hypervistest"
	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// TestContract holds the QEMU driver to the driver contract with real
// guests (TCG, the default image): boot, pause, snapshot, restore into a
// started and into a prelaunched QEMU, and the qcow2 disk calls.
func TestContract(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img, err := image.EnsureDefault(ctx, image.Options{CacheDir: testutil.CacheDir(), AgentPath: testutil.Agent(t)})
	if err != nil {
		t.Fatal(err)
	}
	d, err := hypervisor.Get(qemu.Name)
	if err != nil {
		t.Fatal(err)
	}
	cmdline := strings.Join(append([]string{"console=ttyS0", "reboot=t", "panic=-1", "quiet", "smolvm.hostname=contract"}, image.TCGKernelArgs()...), " ")
	hypervistest.Contract(t, d, hypervistest.Fixture{
		Machine: func(t *testing.T, dir string) *hypervisor.MachineConfig {
			return &hypervisor.MachineConfig{ID: "contract", Dir: dir, Kernel: img.Kernel, Initrd: img.Initrd, Cmdline: cmdline,
				VCPUs: 1, MemoryMiB: 256, Accel: hypervisor.AccelTCG, Channel: hypervisor.ChannelVirtioSerial,
				ConsoleLog: filepath.Join(dir, "console.log")}
		},
		BaseDisk: func(t *testing.T, path string) {
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", path, "64M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v: %s", err, out)
			}
		},
	})
}
