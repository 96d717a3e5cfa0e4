package engine

import (
	"fmt"
	"os"
	"strings"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/wire"
)

// KernelCmdline is the kernel command line of a VM of the stock kernel.
func KernelCmdline(hostname string, accel hypervisor.Accel, extra string) string {
	return GuestCmdline(hostname, accel, extra, false)
}

// GuestCmdline is the kernel command line of a VM. The tuned kernel has no
// i8042 (PS/2) driver, so the options that keep the stock kernel's driver
// from probing for a controller microvm does not have are left out; it needs
// nothing else: its drivers are built in and find the virtio-mmio devices
// through ACPI like the stock kernel's modules do.
func GuestCmdline(hostname string, accel hypervisor.Accel, extra string, tuned bool) string {
	parts := []string{"console=ttyS0", "reboot=t", "panic=-1", "quiet", "loglevel=3"}
	if !tuned {
		parts = append(parts, "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd")
	}
	// Debian zeroes every page it hands out (init_on_alloc) and runs the
	// crypto self-tests at boot: under software emulation the two cost
	// about half a second of every cold boot and buy a single-tenant
	// sandbox nothing. (The warm snapshot's boot adds init_on_free, so that
	// freed memory is zero and the snapshot small: see warmBootArgs.)
	parts = append(parts, "init_on_alloc=0", "cryptomgr.notests", wire.ParamHostname+"="+hostname)
	// An idle guest should not wake: kcompactd's proactive compaction
	// (every 500 ms) and the lockup watchdog's timer (every 4 s, for
	// lockups a sandbox has no one to report to) were most of an idle
	// guest's timer interrupts after the PIT, each a wake-up of QEMU
	// (under TCG, 0.35 → 0.08 % of a host core). Compaction on demand
	// stays.
	parts = append(parts, idleKernelArgs...)
	if !tuned {
		// The tuned kernel has neither a lockup detector nor PSI. PSI's
		// averaging work (every 2 s) kept itself going on an idle guest:
		// the kworker that ran it counted as activity, so it re-armed
		// forever, two thirds of an idle guest's wakes (each a wake of
		// QEMU) once the PIT was gone. Nothing in the guest reads
		// /proc/pressure.
		parts = append(parts, "nowatchdog", "psi=0")
	}
	if accel == hypervisor.AccelTCG {
		parts = append(parts, image.TCGKernelArgs()...)
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	if env := strings.TrimSpace(os.Getenv(BootArgsEnv)); env != "" {
		parts = append(parts, env)
	}
	return strings.Join(parts, " ")
}

// BootArgsEnv names kernel command line arguments added to every VM's
// boot after all others, for debugging boots: "loglevel=7 smolvm.debug=1"
// lifts the quiet console (a later loglevel wins) and logs the agent's
// steps, so that a boot that never answers shows how far it got. A VM
// booted with it does not match the warm snapshot (its command line
// differs), so it boots cold.
const BootArgsEnv = "SMOLVM_BOOT_ARGS"

// idleKernelArgs keep an idle guest's kernel from waking (see GuestCmdline).
// The NIC's IPv6 sends no router solicitations: the user-mode network is
// IPv4 only, and each one (backing off from 4 s) woke the supervisor.
var idleKernelArgs = []string{"sysctl.vm.compaction_proactiveness=0", "sysctl.net.ipv6.conf.default.router_solicitations=0"}

// ResolveChannel picks the agent channel: want, else vsock where the host
// has /dev/vhost-vsock, else virtio-serial.
func ResolveChannel(want string) (hypervisor.Channel, error) {
	switch hypervisor.Channel(want) {
	case hypervisor.ChannelVirtioSerial:
		return hypervisor.ChannelVirtioSerial, nil
	case hypervisor.ChannelVsock:
		if !haveVhostVsock() {
			return "", fmt.Errorf("%w: channel vsock needs /dev/vhost-vsock (modprobe vhost_vsock), or use virtio-serial", errdefs.ErrUnsupported)
		}
		return hypervisor.ChannelVsock, nil
	}
	if haveVhostVsock() {
		return hypervisor.ChannelVsock, nil
	}
	return hypervisor.ChannelVirtioSerial, nil
}

func haveVhostVsock() bool {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
