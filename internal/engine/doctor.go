package engine

import (
	"context"
	"fmt"
	"os"

	"github.com/smolvm/smolvm/internal/hypervisor/qemu"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
)

// Check is one of doctor's findings (smolvm.HostCheck documents it; same
// fields, in the same order).
type Check struct {
	Name   string
	OK     bool
	Detail string
	Fix    string
}

// Virtiofsd is the daemon that serves a VM's host folders.
const Virtiofsd = qemu.Virtiofsd

// ToolChecks are doctor's findings about QEMU and the host's packages.
func ToolChecks(ctx context.Context) []Check {
	var out []Check
	if v, err := qemu.Version(ctx, ""); err != nil {
		out = append(out, Check{Name: "qemu", Detail: err.Error(), Fix: "smolvm setup"})
	} else {
		out = append(out, Check{Name: "qemu", OK: true, Detail: "qemu-system-x86_64 " + v})
	}
	for _, p := range image.CheckHost(ctx) {
		c := Check{Name: p.Missing, Detail: p.Detail, Fix: "apt-get install " + p.Package}
		if p.Optional {
			// Needed only by disk images and the bench: VMs run without.
			c.OK, c.Detail = true, "optional, "+p.Detail
		}
		out = append(out, c)
	}
	return out
}

// JailChecks are doctor's findings about QEMU's least privilege: its user
// and namespaces, and (as root) its cgroups.
func JailChecks() []Check {
	var out []Check
	h := jail.Detect()
	switch {
	case !h.Root:
		out = append(out, Check{Name: "jail", OK: true, Detail: fmt.Sprintf("not root (uid %d): QEMU runs as this user, without a mount namespace or cgroup of its own (both need root): "+
			"a guest that escapes QEMU can reach everything this user can, and nothing bounds its memory, CPU or threads", os.Geteuid()), Fix: "run smolvm as root for jailed QEMUs"})
	case h.UserErr != nil:
		out = append(out, Check{Name: "jail", OK: true, Detail: "QEMU runs as root (" + h.UserErr.Error() + "): a guest that escapes QEMU is root on the host", Fix: "smolvm setup"})
	case jail.Disabled():
		out = append(out, Check{Name: "jail", OK: true, Detail: jail.DisableEnv + "=off: QEMU runs as root, with the host's whole file system", Fix: "unset " + jail.DisableEnv})
	case h.IDsErr != nil:
		out = append(out, Check{Name: "jail", OK: true, Detail: fmt.Sprintf("QEMU runs as user %s (uid %d), one uid for every VM (%v): a QEMU that escaped its mount namespace could open other VMs' files; in mount and pid namespaces of its own that show only its files", jail.User, h.UID, h.IDsErr), Fix: "smolvm setup"})
	default:
		out = append(out, Check{Name: "jail", OK: true, Detail: fmt.Sprintf("each QEMU runs as a uid and gid of its own, from %d-%d (reserved for user %s in /etc/subuid and /etc/subgid; group %s, %d, for the shared read-only files), in mount and pid namespaces of its own that show only its files",
			h.IDs.Start, h.IDs.Start+h.IDs.Count-1, jail.User, jail.User, h.GID)})
	}
	if h.Root {
		cs := h.Cgroups
		c := Check{Name: "cgroups", OK: true}
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
		if h.UserErr == nil { // a guest's other users in host folders
			out = append(out, subIDCheck())
		}
	}
	return out
}

// subIDCheck reports (smolvm doctor) the subordinate ids that host
// folders map a guest's users other than root to (jail.SubIDs).
func subIDCheck() Check {
	c := Check{Name: "host folders", OK: true}
	if uids, gids, ok := jail.SubIDs(0); ok {
		c.Detail = fmt.Sprintf("a guest user N's files in a writable host folder belong to subordinate id start+N-1 on the host: uids from %d, gids from %d (a folder whose owner has subordinate ids of its own in /etc/subuid and /etc/subgid uses those)", uids.Start, gids.Start)
	} else {
		c.Detail = "no subordinate ids for user " + jail.User + " in /etc/subuid and /etc/subgid: in a writable host folder only the guest's root can make files"
		c.Fix = "smolvm setup"
	}
	return c
}
