package qemu

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/hypervisor"
)

// TestTAPFileArgs: a NIC with an open TAP queue gets it as the next file
// descriptor after the snapshot's memory, in the order of ExtraFiles.
func TestTAPFileArgs(t *testing.T) {
	open := func() *os.File {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	mem, tap := open(), open()
	for _, c := range []struct {
		incoming string
		fd       string
		files    []*os.File
	}{
		{"", "fd=3", []*os.File{tap}},
		{"/snap", "fd=4", []*os.File{mem, tap}},
	} {
		cfg := &hypervisor.MachineConfig{Dir: "/vm", Kernel: "k", VCPUs: 1, MemoryMiB: 128, Incoming: c.incoming,
			Net: []hypervisor.NetDevice{{MAC: "5a:94:ac:10:00:02", TAP: "smv0123456789ab", TAPFile: tap}}}
		args := strings.Join(buildArgs(cfg, cfg.Dir), " ")
		if !strings.Contains(args, "-netdev tap,id=net0,"+c.fd+" ") || strings.Contains(args, "ifname=") ||
			!strings.Contains(args, "virtio-net-device,netdev=net0,mac=5a:94:ac:10:00:02") {
			t.Errorf("incoming %q: args %s", c.incoming, args)
		}
		if got := extraFiles(cfg, mem); !slices.Equal(got, c.files) {
			t.Errorf("incoming %q: extra files %v", c.incoming, got)
		}
	}
}
