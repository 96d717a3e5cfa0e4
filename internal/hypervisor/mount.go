package hypervisor

// Mount shares a host folder with the guest (QEMU: virtiofs, one
// virtiofsd per mount). The guest finds it by Tag; the guest agent
// mounts it where the kernel command line says (smolvm.mount=).
type Mount struct {
	Tag      string // the device's mount tag, e.g. "smolvm0"
	HostPath string // absolute, symbolic links resolved
	ReadOnly bool   // enforced on the host: the folder is bound read-only for the daemon
}
