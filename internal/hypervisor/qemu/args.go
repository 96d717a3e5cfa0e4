package qemu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/smolvm/smolvm/internal/hypervisor"
)

// Files a machine keeps in its state folder.
const (
	qmpSocket   = "qmp.sock"
	agentSocket = "agent.sock"
	fastSocket  = "fast.sock"
	netSocket   = "net.sock"
)

// incomingFD is the file descriptor a snapshot's memory file is passed on.
const incomingFD = 3

// extraFiles are the files QEMU inherits, from fd 3 on: the snapshot's
// memory when restoring, then the TAP queue of each NIC that has one;
// the console's pipe comes after them (consoleFD). buildArgs numbers
// them the same way.
func extraFiles(cfg *hypervisor.MachineConfig, memory *os.File) []*os.File {
	var fs []*os.File
	if cfg.Restore != nil {
		fs = append(fs, memory)
	}
	for _, n := range cfg.Net {
		if n.TAPFile != nil && n.StreamSocket == "" {
			fs = append(fs, n.TAPFile)
		}
	}
	return fs
}

// consoleFDSet is the QEMU fd set (-add-fd) that holds the console's pipe.
const consoleFDSet = 1

// consoleFD is the file descriptor of the pipe QEMU writes the guest's
// serial console to: the one after extraFiles.
func consoleFD(cfg *hypervisor.MachineConfig) int {
	return incomingFD + len(extraFiles(cfg, nil))
}

// tcgCPU is the CPU model under TCG: everything QEMU emulates except ERMS
// ("enhanced REP MOVSB/STOSB"). With it, the guest kernel copies and clears
// memory with rep movsb/stosb, which TCG (QEMU 7.2) runs one byte per
// iteration; without it, eight bytes (rep movsq/stosq). That is every page
// the guest zeroes, every read and write it copies, and the initramfs it
// unpacks: unpacking it went from 65–120 ms to 33–40 ms, a tuned cold boot
// from 592 to 543 ms to the agent serving (docs/benchmarks.md).
const tcgCPU = "max,-erms"

// buildArgs turns a machine config into QEMU's argv (without the binary).
func buildArgs(cfg *hypervisor.MachineConfig, dir string) []string {
	p := func(name string) string { return dir + "/" + name }
	args := []string{
		"-name", "smolvm-" + cfg.ID,
		// pit=off: no i8254. The guest kernels run on the local APIC
		// timer and the TSC and never program it, but QEMU's PIT stays in
		// its reset mode and woke the main loop 36 times a second: 60 % of
		// an idle machine's host CPU.
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,memory-backend=" + memoryID,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// Seccomp: no new privileges, no spawning, no resource changes.
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-m", strconv.Itoa(cfg.MemoryMiB),
		"-object", memoryBackend(cfg),
		"-smp", strconv.Itoa(cfg.VCPUs),
		"-qmp", "unix:" + p(qmpSocket) + ",server=on,wait=off",
		// The console goes through a pipe to the process that started
		// QEMU, which keeps its newest part (internal/consolelog): a file
		// would grow with all the guest ever writes. Its file backend
		// takes a path: the inherited pipe is put in an fd set and named
		// by /dev/fdset/N, which QEMU resolves itself (a jailed QEMU has
		// no /proc to open /proc/self/fd/N through).
		"-add-fd", "fd=" + strconv.Itoa(consoleFD(cfg)) + ",set=" + strconv.Itoa(consoleFDSet),
		"-chardev", "file,id=console,append=on,path=/dev/fdset/" + strconv.Itoa(consoleFDSet), // append: QEMU would truncate, which a pipe refuses
		"-serial", "chardev:console",
		"-device", "virtio-rng-device",
	}
	if cfg.Accel == hypervisor.AccelKVM {
		args = append(args, "-accel", "kvm", "-cpu", "host")
	} else {
		args = append(args, "-accel", "tcg,tb-size="+strconv.Itoa(tcgCacheMiB), "-cpu", tcgCPU)
	}
	if cfg.Restore == nil {
		args = append(args, "-kernel", escape(cfg.Kernel))
		if cfg.Initrd != "" {
			args = append(args, "-initrd", escape(cfg.Initrd))
		}
		args = append(args, "-append", cfg.Cmdline)
	} else {
		// A restored machine gets its memory from the snapshot: no
		// kernel or initramfs to read and load (tens of megabytes, and
		// QEMU would only drop them). Deferred: the stream's format
		// depends on migration capabilities, set over QMP first.
		args = append(args, "-incoming", "defer")
	}
	switch cfg.Channel {
	case hypervisor.ChannelVsock:
		args = append(args, "-device", fmt.Sprintf("vhost-vsock-device,guest-cid=%d", cfg.CID))
	default:
		args = append(args,
			"-device", "virtio-serial-device,max_ports=3",
			"-chardev", "socket,id=agent,path="+p(agentSocket)+",server=on,wait=off",
			"-device", "virtserialport,chardev=agent,name="+hypervisor.AgentPortName,
			"-chardev", "socket,id=fast,path="+p(fastSocket)+",server=on,wait=off",
			"-device", "virtserialport,chardev=fast,name="+hypervisor.FastPortName,
		)
	}
	for i, d := range cfg.Disks {
		format := d.Format
		if format == "" {
			format = "raw"
		}
		drive := fmt.Sprintf("id=disk%d,if=none,file=%s,format=%s,cache=unsafe,discard=unmap", i, escape(d.Path), format)
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		args = append(args, "-drive", drive, "-device", fmt.Sprintf("virtio-blk-device,drive=disk%d", i))
	}
	nextFD := incomingFD
	if cfg.Restore != nil {
		nextFD++
	}
	for i, n := range cfg.Net {
		var netdev string
		switch {
		case n.StreamSocket != "":
			netdev = fmt.Sprintf("stream,id=net%d,server=off,addr.type=unix,addr.path=%s", i, escape(n.StreamSocket))
		case n.TAPFile != nil:
			// An open queue of a TAP the supervisor created: QEMU needs
			// no privileges and keeps its seccomp sandbox.
			netdev = fmt.Sprintf("tap,id=net%d,fd=%d", i, nextFD)
			nextFD++
		case n.TAP != "":
			netdev = fmt.Sprintf("tap,id=net%d,ifname=%s,script=no,downscript=no", i, escape(n.TAP))
		default:
			continue
		}
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d", i)
		if n.MAC != "" {
			dev += ",mac=" + n.MAC
		}
		args = append(args, "-netdev", netdev, "-device", dev)
	}
	return args
}

// memoryID names guest RAM: the memory backend object, and so the RAM
// block a migration stream refers to.
const memoryID = "mem"

// memoryBackend describes guest RAM: anonymous memory, or a file: the
// machine's own, shared (MachineConfig.MemoryFile), or a restored
// snapshot's, mapped copy-on-write (see guestMemory).
func memoryBackend(cfg *hypervisor.MachineConfig) string {
	size := strconv.Itoa(cfg.MemoryMiB) + "M"
	path, shared := guestMemory(cfg)
	if path == "" {
		return "memory-backend-ram,id=" + memoryID + ",size=" + size
	}
	share := "off"
	if shared {
		share = "on"
	}
	return "memory-backend-file,id=" + memoryID + ",size=" + size + ",mem-path=" + escape(path) + ",share=" + share
}

// guestMemory is the file that backs guest RAM ("" for anonymous memory)
// and whether the guest writes through to it. A machine that boots has
// its MemoryFile, shared; a restored one maps its snapshot's memory file
// privately, when the snapshot has one (its source's memory was a file),
// and gets fresh memory otherwise (the state file holds it).
func guestMemory(cfg *hypervisor.MachineConfig) (path string, shared bool) {
	if cfg.Restore == nil {
		return cfg.MemoryFile, cfg.MemoryFile != ""
	}
	if p := Layout.MemoryPath(cfg.Restore.Dir); fileExists(p) {
		return p, false
	}
	return "", false
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// escape doubles commas, QEMU's option separator, in a value.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }
