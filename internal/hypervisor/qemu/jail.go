package qemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
)

// MemoryOverheadMiB is what QEMU may hold beyond guest memory, the
// margin of its cgroup's memory limit. Measured under TCG (smaps, after
// a boot and a command that loops, hashes 64 MiB and walks the file
// system): a cold-booted 512 MiB guest's QEMU held 157 MiB beyond the
// guest pages it had touched, about 55 MiB of it the translated-code
// cache, and one restored from the warm snapshot 58 MiB. The cache is
// capped at tcgCacheMiB; the rest is QEMU's own 100 MiB and headroom.
const MemoryOverheadMiB = tcgCacheMiB + 192

// tcgCacheMiB caps TCG's translated-code cache (QEMU 7.2's default is
// 1 GiB, which a busy guest fills over time): the cache is flushed when
// full instead of growing past the cgroup's memory limit.
const tcgCacheMiB = 256

// pidsMax bounds QEMU's threads (main, I/O, RCU, one per vCPU and a pool
// of up to 64 workers); it spawns no processes (-sandbox spawn=deny).
const pidsMax = 128

// JailDir is the empty folder a jail's root is mounted on, in each
// jailed QEMU's own mount namespace (in /run, where only root writes).
const JailDir = "/run/smolvm/jail"

// jailFor describes the jail of the machine cfg: QEMU runs as
// jail.User, sees the system folders, its own state folder and the
// files of cfg, and starts in a cgroup of its own. It makes the state
// folder and the files QEMU opens by path usable by that user. It
// returns nil when the host cannot jail (not root, no such user,
// SMOLVM_JAIL=off) or cfg needs privileges (a TAP opened by name).
func jailFor(cfg *hypervisor.MachineConfig, host *jail.Host) (*jail.Jail, error) {
	if !host.Usable() || jail.Disabled() {
		return nil, nil
	}
	for _, n := range cfg.Net {
		if n.TAP != "" && n.TAPFile == nil {
			return nil, nil
		}
	}
	j := &jail.Jail{UID: host.UID, GID: host.GID, Root: JailDir}
	if fi, err := os.Lstat(JailDir); err == nil && !fi.IsDir() {
		return nil, fmt.Errorf("jail: %s is not a folder", JailDir)
	}
	if err := os.MkdirAll(JailDir, 0o700); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	if host.IDsErr == nil && host.IDs.Count > 0 {
		// A uid and gid of its own (uids.go); the group of User (kept as
		// a supplementary group) reaches the shared read-only files.
		id, err := host.IDs.Alloc(cfg.Dir)
		if err != nil {
			return nil, err
		}
		j.UID, j.GID, j.Groups = id, id, []uint32{host.GID}
	}
	// The state folder: QEMU makes its sockets and console log there;
	// sticky, so it cannot remove or replace the supervisor's files.
	if err := os.Chown(cfg.Dir, 0, int(j.GID)); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(cfg.Dir, 0o770|os.ModeSticky); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	j.Writable = append(j.Writable, cfg.Dir)
	inDir := func(p string) bool { return strings.HasPrefix(p, cfg.Dir+"/") }
	// Files in the folder that QEMU opens by path may exist already
	// (a restart, a disk overlay, the network stack's socket).
	owned := []string{cfg.ConsoleLog}
	memory, sharedMemory := guestMemory(cfg)
	if sharedMemory {
		owned = append(owned, memory)
	}
	for _, n := range cfg.Net {
		owned = append(owned, n.StreamSocket)
	}
	for _, d := range cfg.Disks {
		if !d.ReadOnly {
			owned = append(owned, d.Path)
		}
	}
	for _, p := range owned {
		if p == "" {
			continue
		}
		if !inDir(p) {
			// A writable disk of the caller's (Config.RootfsPath,
			// --rootfs): QEMU's group may read and write it, and it is
			// bound into the jail writable. Its owner stays.
			if err := grantGroup(p, host.GID, 0o060); err != nil {
				return nil, err
			}
			j.Writable = append(j.Writable, p)
			continue
		}
		if err := os.Lchown(p, int(j.UID), int(j.GID)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("jail: %w", err)
		}
	}
	// Shared files, bound read-only.
	var shared []string
	if cfg.Restore == nil {
		shared = append(shared, cfg.Kernel, cfg.Initrd)
	}
	for _, d := range cfg.Disks {
		if d.ReadOnly {
			shared = append(shared, d.Path)
		}
		chain, err := backingChain(d.Path)
		if err != nil {
			return nil, fmt.Errorf("jail: %w", err)
		}
		shared = append(shared, chain...)
	}
	for _, p := range shared {
		if p == "" || inDir(p) {
			continue
		}
		if err := grantGroup(p, host.GID, 0o040); err != nil {
			return nil, err
		}
		j.ReadOnly = append(j.ReadOnly, p)
	}
	if memory != "" && !sharedMemory && !inDir(memory) {
		// A snapshot's memory file, mapped copy-on-write. QEMU 7.2 opens
		// a memory-backend-file for writing even when it maps it
		// privately (8.2's rom=on lifts that), so this file must be
		// writable by the jail's group.
		if err := grantGroup(memory, host.GID, 0o060); err != nil {
			return nil, err
		}
		j.Writable = append(j.Writable, memory)
	}
	if cfg.Accel == hypervisor.AccelKVM {
		j.Devices = append(j.Devices, "/dev/kvm")
	}
	if cfg.Channel == hypervisor.ChannelVsock {
		j.Devices = append(j.Devices, "/dev/vhost-vsock")
	}
	if host.Cgroups.Version() != "" {
		// The virtiofsd of each host folder runs in it too (virtiofs.go).
		n := len(cfg.Mounts)
		cg, err := host.Cgroups.CreateCgroup("smolvm-"+cfg.ID, jail.Limits{
			MemoryBytes: int64(cfg.MemoryMiB+MemoryOverheadMiB+n*fsOverheadMiB) << 20,
			CPUs:        cfg.VCPUs,
			Pids:        pidsMax + n*fsPids,
		})
		if err != nil {
			return nil, fmt.Errorf("jail: %w", err)
		}
		j.Cgroup = cg
		if err := cg.Record(cfg.Dir); err != nil {
			_ = cg.Remove()
			return nil, fmt.Errorf("jail: %w", err)
		}
	}
	return j, nil
}

// grantGroup gives gid the permission bits perm (group bits) on path,
// unless every user has them already.
func grantGroup(path string, gid uint32, perm os.FileMode) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	other := perm >> 3
	st, _ := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm()&other == other || st != nil && st.Gid == gid && fi.Mode().Perm()&perm == perm {
		return nil
	}
	if err := os.Chown(path, -1, int(gid)); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(path, fi.Mode().Perm()|perm); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	return nil
}

// backingChain returns the backing files of a qcow2 image (its own
// backing file, that one's, and so on); nothing for a raw image.
func backingChain(path string) ([]string, error) {
	var chain []string
	for i := 0; i < 16; i++ {
		next, err := qcow2Backing(path)
		if err != nil || next == "" {
			return chain, err
		}
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(path), next)
		}
		chain = append(chain, next)
		path = next
	}
	return nil, fmt.Errorf("%s: backing chain deeper than 16", path)
}

// qcow2Backing reads the backing file name from a qcow2 header ("" for
// none, or for a file that is not qcow2).
func qcow2Backing(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var h struct {
		Magic   uint32
		Version uint32
		Offset  uint64
		Size    uint32
	}
	if err := binary.Read(f, binary.BigEndian, &h); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return "", nil
		}
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if h.Magic != 0x514649fb || h.Offset == 0 || h.Size == 0 {
		return "", nil
	}
	if h.Size > 1023 {
		return "", fmt.Errorf("%s: backing file name of %d bytes", path, h.Size)
	}
	name := make([]byte, h.Size)
	if _, err := f.ReadAt(name, int64(h.Offset)); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return string(name), nil
}
