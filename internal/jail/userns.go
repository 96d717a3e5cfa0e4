package jail

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// IDMap runs a jailed process as root of a user namespace of its own
// whose root is UID and GID on the host, and whose ids 1, 2, … are the
// host's SubUIDs and SubGIDs (SubIDs; none when their Count is 0): it
// holds capabilities only over its own namespaces and over files that
// those ids own, and files it makes as root belong to UID and GID, as
// id N to the range's Start+N-1 (rootless Podman's mapping).
type IDMap struct {
	UID, GID         uint32
	SubUIDs, SubGIDs IDRange
}

// Bind binds host path Source at Target inside the jail (Target need not
// exist on the host). Its mount is nosuid and nodev, read-only with
// ReadOnly; a process in a user namespace of its own (Jail.UserNS)
// cannot make it writable, nor lift those flags: the kernel locks the
// flags of mounts a less privileged namespace inherits.
type Bind struct {
	Source, Target string
	ReadOnly       bool
	// Tree, when set, is what is bound: the folder Source that OpenTree
	// opened (Source then only names it in errors).
	Tree *os.File
}

// userNS sets attr up to start the process in a user namespace mapped
// by m, as its root without supplementary groups (the caller's would be
// kept otherwise, and a namespace that denies setgroups could not drop
// them).
func (m *IDMap) userNS(attr *syscall.SysProcAttr) {
	attr.Cloneflags |= unix.CLONE_NEWUSER
	attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(m.UID), Size: 1}}
	attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(m.GID), Size: 1}}
	// Written by this process, root of the host's namespace, to the
	// child's uid_map and gid_map before it runs on.
	if m.SubUIDs.Count > 0 {
		attr.UidMappings = append(attr.UidMappings, syscall.SysProcIDMap{ContainerID: 1, HostID: int(m.SubUIDs.Start), Size: int(m.SubUIDs.Count)})
	}
	if m.SubGIDs.Count > 0 {
		attr.GidMappings = append(attr.GidMappings, syscall.SysProcIDMap{ContainerID: 1, HostID: int(m.SubGIDs.Start), Size: int(m.SubGIDs.Count)})
	}
	attr.GidMappingsEnableSetgroups = true
	attr.Credential = &syscall.Credential{Uid: 0, Gid: 0, Groups: []uint32{}}
}

// bindAt binds b.Source at b.Target in the jail's root.
func (j *Jail) bindAt(b Bind) error {
	if b.Tree == nil {
		fi, err := os.Stat(b.Source)
		if err != nil {
			return fmt.Errorf("jail: bind: %w", err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("jail: bind %s: not a folder", b.Source)
		}
	}
	dst := j.Root + b.Target
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	// Not recursive (nor is OpenTree's copy): what is mounted below the
	// folder on the host stays out (the process sees the folder's own
	// file system only).
	if b.Tree != nil {
		if err := bindTree(b, dst); err != nil {
			return err
		}
	} else if err := unix.Mount(b.Source, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("jail: bind %s: %w", b.Source, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if b.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", dst, "", flags, ""); err != nil {
		return fmt.Errorf("jail: restrict bind %s: %w", b.Source, err)
	}
	return nil
}
