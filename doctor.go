package smolvm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/hostcap"
)

// HostCheck is one fact CheckHost found about this host: OK, or not and
// the Fix.
type HostCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// CheckHost checks what VMs need on this host, for `smolvm doctor` and
// health endpoints: QEMU, host tools, the guest agent, the default image,
// KVM or TCG, the agent channel, how QEMU is confined, the capacity limits
// and the state folder home ("" = Home()). It opens no Host, so that it
// reports a state folder that cannot be opened; it does not change the
// host, except that it probes KVM (once, cached) when the default image is
// ready.
func CheckHost(ctx context.Context, home string) []HostCheck {
	var out []HostCheck
	if home == "" {
		home = Home()
	}
	out = append(out, checksOf(engine.ToolChecks(ctx))...)
	agent, err := AgentBinary()
	if err != nil {
		out = append(out, HostCheck{Name: "agent", Detail: err.Error(), Fix: "make build"})
	} else {
		out = append(out, HostCheck{Name: "agent", OK: true, Detail: agent})
	}
	d, err := Setup(ctx, SetupOptions{Home: home, CachedOnly: true})
	if err != nil {
		out = append(out, HostCheck{Name: "image", Detail: "default image not ready: " + err.Error(), Fix: "smolvm setup"})
	} else {
		out = append(out, HostCheck{Name: "image", OK: true, Detail: fmt.Sprintf("kernel %s, initramfs %s", d.KernelVersion, filepath.Base(d.Initrd))})
		rep := engine.ProbeAccel(ctx, home, d.Kernel, d.Initrd)
		out = append(out, HostCheck{Name: "accel", OK: true, Detail: rep.Accel + ": " + rep.Reason})
	}
	if _, err := os.Stat("/dev/vhost-vsock"); err == nil {
		out = append(out, HostCheck{Name: "channel", OK: true, Detail: "vsock (/dev/vhost-vsock present)"})
	} else {
		out = append(out, HostCheck{Name: "channel", OK: true, Detail: "virtio-serial (no /dev/vhost-vsock; modprobe vhost_vsock for vsock)"})
	}
	out = append(out, privilegeChecks(home)...)
	if err := os.MkdirAll(home, 0o700); err != nil {
		out = append(out, HostCheck{Name: "state folder", Detail: err.Error(), Fix: "set SMOLVM_HOME to a writable folder"})
	} else if f, err := os.CreateTemp(home, ".doctor-"); err != nil {
		out = append(out, HostCheck{Name: "state folder", Detail: home + " is not writable: " + err.Error(), Fix: "set SMOLVM_HOME to a writable folder"})
	} else {
		f.Close()
		os.Remove(f.Name())
		out = append(out, HostCheck{Name: "state folder", OK: true, Detail: home})
	}
	return out
}

// privilegeChecks report how QEMU is confined on this host and what is
// missing, with its cost; and the host's capacity limits.
func privilegeChecks(home string) []HostCheck {
	return append(checksOf(engine.JailChecks()), capacityCheck(home))
}

// capacityCheck reports the host's limits, where each comes from, and
// what the VMs of every state folder and the prelaunched hypervisors
// (spares) hold now.
func capacityCheck(home string) HostCheck {
	c := HostCheck{Name: "capacity", OK: true}
	l, err := (&Config{}).capacity()
	if err != nil {
		c.OK, c.Detail = false, err.Error()
		c.Fix = fmt.Sprintf("set %s and %s to a positive number, -1 for no limit, or unset them; or 'smolvm setup --max-vms N --max-memory SIZE'", MaxVMsEnv, MaxMemoryMiBEnv)
		return c
	}
	c.Detail = fmt.Sprintf("new VMs are refused past %s VMs (from %s) or %s MiB of guest memory (from %s), counted over every state folder of the host",
		limitText(l.MaxVMs), l.vmsFrom, limitText(l.MaxMemoryMiB), l.memFrom)
	if u, homes, err := hostcap.Usage(context.Background(), hostcap.Dir(), engine.ProcessAlive); err != nil {
		c.Detail += "; " + err.Error()
	} else {
		c.Detail += fmt.Sprintf("; now %d VMs and %d MiB in %d state folders (registry: %s)", u.VMs, u.MemoryMiB, homes, hostcap.Dir())
	}
	if sp := hostcap.SparesOn(hostcap.Dir(), home, engine.ProcessAlive); len(sp) > 0 {
		mem := 0
		for _, s := range sp {
			mem += s.MemoryMiB
		}
		c.Detail += fmt.Sprintf(", and %d prelaunched hypervisors of %d MiB, which give way to new VMs", len(sp), mem)
	}
	return c
}

// limitText shows a resolved limit (0: none).
// checksOf are the engine's checks as the API's.
func checksOf(cs []engine.Check) []HostCheck {
	out := make([]HostCheck, 0, len(cs))
	for _, c := range cs {
		out = append(out, HostCheck(c))
	}
	return out
}

func limitText(n int) string {
	if n == 0 {
		return "unlimited"
	}
	return strconv.Itoa(n)
}
