package hypervisor

// Mount shares a host folder with the guest (QEMU: virtiofs, one
// virtiofsd per mount). The guest finds it by Tag; the guest agent
// mounts it where the kernel command line says (smolvm.mount=).
type Mount struct {
	Tag      string // the device's mount tag, e.g. "smolvm0"
	HostPath string // absolute, symbolic links resolved
	ReadOnly bool   // enforced on the host: the folder is bound read-only for the daemon
	// Within, when set, is a folder (absolute, symbolic links resolved)
	// that HostPath must lie beneath when its daemon starts: the driver
	// opens HostPath from there following no symbolic link, and binds
	// what it opened (jail.OpenTree). Without it, from /.
	Within string `json:",omitempty"`
}
