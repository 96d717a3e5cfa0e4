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
		cfg := &hypervisor.MachineConfig{Dir: "/vm", Kernel: "k", VCPUs: 1, MemoryMiB: 128, Restore: restore(c.incoming),
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

// TestMemoryBackend: guest RAM is always the backend "mem" (snapshots refer
// to its RAM block by that name); a machine's memory file is shared, and a
// restore maps its snapshot's memory file privately when the snapshot has
// one.
func TestMemoryBackend(t *testing.T) {
	withRAM, withoutRAM := t.TempDir(), t.TempDir()
	if err := os.WriteFile(Layout.MemoryPath(withRAM), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file     string
		incoming string
		want     string
	}{
		{"", "", "memory-backend-ram,id=mem,size=256M"},
		{"/vm/ram", "", "memory-backend-file,id=mem,size=256M,mem-path=/vm/ram,share=on"},
		{"", withRAM, "memory-backend-file,id=mem,size=256M,mem-path=" + withRAM + "/ram,share=off"},
		{"", withoutRAM, "memory-backend-ram,id=mem,size=256M"},
		{"/a,b/ram", "", "memory-backend-file,id=mem,size=256M,mem-path=/a,,b/ram,share=on"},
	} {
		cfg := &hypervisor.MachineConfig{Dir: "/vm", Kernel: "k", VCPUs: 1, MemoryMiB: 256,
			MemoryFile: c.file, Restore: restore(c.incoming)}
		args := buildArgs(cfg, cfg.Dir)
		i := slices.Index(args, "-object")
		if i < 0 || args[i+1] != c.want {
			t.Errorf("%+v: memory %v, want %s", c, args, c.want)
		}
		if !slices.ContainsFunc(args, func(a string) bool {
			return strings.HasPrefix(a, "microvm,") && strings.HasSuffix(a, ",memory-backend=mem")
		}) {
			t.Errorf("%+v: machine does not use the backend: %v", c, args)
		}
		// A restore loads no kernel; a boot has one.
		restoring := slices.Contains(args, "-incoming")
		if restoring != (c.incoming != "") || restoring == slices.Contains(args, "-kernel") || restoring == slices.Contains(args, "-append") {
			t.Errorf("%+v: kernel and incoming args: %v", c, args)
		}
	}
}

// restore is a restore of the snapshot in dir, or nil for "".
func restore(dir string) *hypervisor.Restore {
	if dir == "" {
		return nil
	}
	return &hypervisor.Restore{Dir: dir}
}

// TestNoPIT: the machine has no i8254, whose reset mode woke an idle
// QEMU 36 times a second (the guests never use it).
func TestNoPIT(t *testing.T) {
	args := buildArgs(&hypervisor.MachineConfig{Dir: "/vm", Kernel: "k", VCPUs: 1, MemoryMiB: 256}, "/vm")
	i := slices.Index(args, "-M")
	if i < 0 || !slices.Contains(strings.Split(args[i+1], ","), "pit=off") {
		t.Errorf("machine %v has a PIT", args)
	}
}
