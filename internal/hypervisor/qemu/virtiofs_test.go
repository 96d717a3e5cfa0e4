package qemu

import (
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/hypervisor"
)

func TestFSArgs(t *testing.T) {
	cfg := &hypervisor.MachineConfig{ID: "x", Dir: "/s", Kernel: "/k", VCPUs: 1, MemoryMiB: 256}
	if args := strings.Join(buildArgs(cfg, "/s"), " "); strings.Contains(args, "vhost-user-fs") || strings.Contains(args, "force-legacy") ||
		!strings.Contains(args, "memory-backend-ram") {
		t.Errorf("a machine without host folders: %s", args)
	}
	cfg.Mounts = []hypervisor.Mount{{Tag: "smolvm0", HostPath: "/h", ReadOnly: true}, {Tag: "smolvm1", HostPath: "/g"}}
	args := strings.Join(buildArgs(cfg, "/s"), " ")
	for _, want := range []string{
		"memory-backend-memfd,id=mem,size=256M,share=on",
		"-global virtio-mmio.force-legacy=false",
		"-chardev socket,id=fs0,path=/s/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=smolvm0",
		"-chardev socket,id=fs1,path=/s/fs1.sock -device vhost-user-fs-device,chardev=fs1,tag=smolvm1",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("args lack %q: %s", want, args)
		}
	}
	if strings.Contains(args, "/h") || strings.Contains(args, "/g") {
		t.Errorf("QEMU's arguments name a host folder (only its daemon sees it): %s", args)
	}
}
