package engine

import (
	"strconv"
	"strings"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
)

// Mount is a host folder the guest sees (smolvm.Mount, checked).
type Mount struct {
	HostPath, GuestPath string
	ReadOnly            bool
	Within              string // a folder HostPath must lie beneath, opened from at each boot (smolvm.Mount.Within)
}

// ErrLinkOnPath: a host folder's path holds a symbolic link where it
// was checked to hold none (jail.ErrLinkOnPath).
var ErrLinkOnPath = jail.ErrLinkOnPath

// machineMounts are the VM's host folders for the hypervisor, tagged
// smolvm0, smolvm1, …
func machineMounts(ms []Mount) []hypervisor.Mount {
	var out []hypervisor.Mount
	for i, m := range ms {
		out = append(out, hypervisor.Mount{Tag: "smolvm" + strconv.Itoa(i), HostPath: m.HostPath, ReadOnly: m.ReadOnly, Within: m.Within})
	}
	return out
}

// mountArgs are the kernel command line options that tell the guest
// agent where to mount each host folder: smolvm.mount=TAG:ro|rw:PATH.
func mountArgs(ms []Mount) string {
	var parts []string
	for i, m := range ms {
		mode := "rw"
		if m.ReadOnly {
			mode = "ro"
		}
		parts = append(parts, "smolvm.mount=smolvm"+strconv.Itoa(i)+":"+mode+":"+m.GuestPath)
	}
	return strings.Join(parts, " ")
}
