package smolvm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/smolvm/smolvm/internal/engine"
	"github.com/smolvm/smolvm/internal/hostcap"
	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
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
	if v, err := qemu.Version(ctx, ""); err != nil {
		out = append(out, HostCheck{Name: "qemu", Detail: err.Error(), Fix: "smolvm setup"})
	} else {
		out = append(out, HostCheck{Name: "qemu", OK: true, Detail: "qemu-system-x86_64 " + v})
	}
	for _, p := range image.CheckHost(ctx) {
		c := HostCheck{Name: p.Missing, Detail: p.Detail, Fix: "apt-get install " + p.Package}
		if p.Optional {
			// Needed only by disk images and the bench: VMs run without.
			c.OK, c.Detail = true, "optional, "+p.Detail
		}
		out = append(out, c)
	}
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
	out = append(out, privilegeChecks()...)
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
func privilegeChecks() []HostCheck {
	h := jail.Detect()
	var out []HostCheck
	switch {
	case !h.Root:
		out = append(out, HostCheck{Name: "jail", OK: true, Detail: fmt.Sprintf("not root (uid %d): QEMU runs as this user, without a mount namespace or cgroup of its own (both need root): "+
			"a guest that escapes QEMU can reach everything this user can, and nothing bounds its memory, CPU or threads", os.Geteuid()), Fix: "run smolvm as root for jailed QEMUs"})
	case h.UserErr != nil:
		out = append(out, HostCheck{Name: "jail", OK: true, Detail: "QEMU runs as root (" + h.UserErr.Error() + "): a guest that escapes QEMU is root on the host", Fix: "smolvm setup"})
	case jail.Disabled():
		out = append(out, HostCheck{Name: "jail", OK: true, Detail: jail.DisableEnv + "=off: QEMU runs as root, with the host's whole file system", Fix: "unset " + jail.DisableEnv})
	case h.IDsErr != nil:
		out = append(out, HostCheck{Name: "jail", OK: true, Detail: fmt.Sprintf("QEMU runs as user %s (uid %d), one uid for every VM (%v): a QEMU that escaped its mount namespace could open other VMs' files; in mount and pid namespaces of its own that show only its files", jail.User, h.UID, h.IDsErr), Fix: "smolvm setup"})
	default:
		out = append(out, HostCheck{Name: "jail", OK: true, Detail: fmt.Sprintf("each QEMU runs as a uid and gid of its own, from %d-%d (reserved for user %s in /etc/subuid and /etc/subgid; group %s, %d, for the shared read-only files), in mount and pid namespaces of its own that show only its files",
			h.IDs.Start, h.IDs.Start+h.IDs.Count-1, jail.User, jail.User, h.GID)})
	}
	if h.Root {
		cs := h.Cgroups
		c := HostCheck{Name: "cgroups", OK: true}
		switch cs.Version() {
		case "v2":
			c.Detail = "v2: a cgroup per QEMU under " + cs.V2 + " (memory.max, cpu.max, pids.max)"
		case "v1":
			c.Detail = "v1 (" + cs.Why + "): a cgroup per QEMU under"
			for _, ctl := range []string{"memory", "cpu", "pids"} {
				if d, ok := cs.V1[ctl]; ok {
					c.Detail += " " + d
				}
			}
		default:
			c.Detail = "none usable (" + cs.Why + ")"
		}
		if cs.Unmounted {
			c.Detail += " (this mount namespace shows no cgroup hierarchy, e.g. under 'ip netns exec': smolvm mounts them itself, attached to no folder)"
		}
		if len(cs.Missing) > 0 {
			c.Detail += fmt.Sprintf("; no %v controller: a VM's QEMU is not bounded in %v (a runaway guest can take the host's)", cs.Missing, cs.Missing)
			c.Fix = "mount the cgroup controllers (v2 with memory, cpu and pids delegated to smolvm's cgroup)"
		}
		out = append(out, c)
	}
	return append(out, capacityCheck())
}

// capacityCheck reports the host's limits, where each comes from, and
// what the VMs of every state folder hold now.
func capacityCheck() HostCheck {
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
	return c
}

// limitText shows a resolved limit (0: none).
func limitText(n int) string {
	if n == 0 {
		return "unlimited"
	}
	return strconv.Itoa(n)
}
