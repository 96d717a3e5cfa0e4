package qemu

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
)

// Virtiofsd is QEMU's virtiofs daemon (Debian's qemu-system-common): one
// runs per host folder of a machine (hypervisor.MachineConfig.Mounts)
// and serves it to QEMU's vhost-user-fs device over a unix socket.
const Virtiofsd = "/usr/lib/qemu/virtiofsd"

// fsOverheadMiB and fsPids are what one virtiofsd adds to its machine's
// cgroup: it runs in QEMU's cgroup, under the same limits.
const (
	fsOverheadMiB = 64
	fsPids        = 80 // its thread pool is 64 at most
)

// fsSocket is the vhost-user socket of mount i in the state folder.
func fsSocket(dir string, i int) string { return filepath.Join(dir, "fs"+strconv.Itoa(i)+".sock") }

// fsSource is where mount i's host folder is bound inside its daemon's
// jail: a path under the state folder, which the daemon's command line
// then names (so cleanup and the leak checker find it by the VM), but
// which exists only in the jail.
func fsSource(dir string, i int) string { return filepath.Join(dir, "fs"+strconv.Itoa(i)) }

// fsArgs are the QEMU arguments of the machine's host folders.
func fsArgs(cfg *hypervisor.MachineConfig, dir string) []string {
	if len(cfg.Mounts) == 0 {
		return nil
	}
	// virtiofsd (libvhost-user) serves only virtio 1.0 devices, and
	// microvm's virtio-mmio transports are legacy ones unless told: a
	// machine with host folders gets modern ones (all of its devices;
	// the guest drives both, and such a machine is never snapshotted, so
	// no snapshot's device state meets the other kind).
	args := []string{"-global", "virtio-mmio.force-legacy=false"}
	for i, mt := range cfg.Mounts {
		id := "fs" + strconv.Itoa(i)
		args = append(args,
			"-chardev", "socket,id="+id+",path="+escape(fsSocket(dir, i)),
			"-device", "vhost-user-fs-device,chardev="+id+",tag="+escape(mt.Tag))
	}
	return args
}

// fsDaemon is one running virtiofsd.
type fsDaemon struct {
	cmd     *exec.Cmd
	release func()
	stderr  *limitedWriter
	done    chan struct{}
}

// startFSDaemons starts a virtiofsd for each of cfg.Mounts, each in a
// jail of its own: a user namespace whose root is the host folder's
// owner (so the guest's files belong to that user, and the daemon holds
// no privilege over anything else), a mount namespace whose root holds
// the system folders read-only and the host folder alone (read-only for
// a read-only mount: the kernel refuses the daemon's writes, whatever
// the guest sends), the cgroup cg (QEMU's) when set, and a seccomp
// filter that refuses setuid and setgid bits and xattr writes (the
// guest's root is the folder's owner; xattrs are off in virtiofsd too,
// as no -o xattr asks for them). virtiofsd
// itself then moves into new mount, pid and network namespaces with the
// folder as its root (pivot_root) and a seccomp filter. The socket QEMU
// connects to is made here, owned by qemuUID and qemuGID (QEMU's jail
// user; 0 when QEMU is not jailed), and handed to the daemon open.
func startFSDaemons(cfg *hypervisor.MachineConfig, qemuUID, qemuGID uint32, cg *jail.Cgroup) (_ []*fsDaemon, err error) {
	if len(cfg.Mounts) == 0 {
		return nil, nil
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("host folders: %w: smolvm must run as root to sandbox virtiofsd", hypervisor.ErrUnsupported)
	}
	if _, err := os.Stat(Virtiofsd); err != nil {
		return nil, fmt.Errorf("host folders need %s: run 'smolvm setup' (or apt-get install qemu-system-common): %w", Virtiofsd, err)
	}
	if err := os.MkdirAll(JailDir, 0o700); err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	var ds []*fsDaemon
	defer func() {
		if err != nil {
			stopFSDaemons(ds, 0)
		}
	}()
	for i, mt := range cfg.Mounts {
		d, err := startFSDaemon(cfg.Dir, i, mt, qemuUID, qemuGID, cg)
		if err != nil {
			return nil, fmt.Errorf("host folder %s: %w", mt.HostPath, err)
		}
		ds = append(ds, d)
	}
	return ds, nil
}

func startFSDaemon(dir string, i int, mt hypervisor.Mount, qemuUID, qemuGID uint32, cg *jail.Cgroup) (*fsDaemon, error) {
	// What was checked is what is served: the folder is opened without
	// following links (a link on its path now means someone swapped a
	// folder for one since the check) and bound from what was opened.
	tree, st, err := jail.OpenTree(mt.Within, mt.HostPath)
	if errors.Is(err, jail.ErrLinkOnPath) {
		return nil, fmt.Errorf("%w: %w: the folder changed since it was checked (swapped for a link?): check where its path leads and give it again", errdefs.ErrInvalid, err)
	}
	if err != nil {
		return nil, err
	}
	defer tree.Close()
	sock := fsSocket(dir, i)
	_ = os.Remove(sock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("virtiofs socket: %w", err)
	}
	l.SetUnlinkOnClose(false) // the daemon serves it from here on
	defer l.Close()
	if err := os.Chown(sock, int(qemuUID), int(qemuGID)); err != nil {
		return nil, fmt.Errorf("virtiofs socket: %w", err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		return nil, fmt.Errorf("virtiofs socket: %w", err)
	}
	lf, err := l.File()
	if err != nil {
		return nil, fmt.Errorf("virtiofs socket: %w", err)
	}
	defer lf.Close()
	source := fsSource(dir, i)
	cmd := exec.Command(Virtiofsd,
		"--fd=3", // lf
		"-o", "source="+source,
		"-o", "sandbox=namespace",
		"-o", "cache=auto",
		"-o", "log_level=warn",
		"--rlimit-nofile=0", // raising it needs a privilege its user namespace lacks
	)
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{lf}
	d := &fsDaemon{cmd: cmd, stderr: &limitedWriter{max: 16 << 10}, done: make(chan struct{})}
	cmd.Stderr = d.stderr
	// It dies with the process that started it, as QEMU does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	j := &jail.Jail{
		Root:   JailDir,
		Binds:  []jail.Bind{{Source: mt.HostPath, Target: source, ReadOnly: mt.ReadOnly, Tree: tree}},
		Proc:   true, // virtiofsd reads its limits there, then mounts its own
		UserNS: fsIDMap(mt, st.Uid, st.Gid),
		Cgroup: cg,
		// The guest's root is the folder's owner: without this, in a
		// folder root owns it leaves setuid-root programs on the host.
		NoSetID: true,
	}
	if d.release, err = j.Start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", Virtiofsd, err)
	}
	go func() {
		if err := cmd.Wait(); err != nil {
			slog.Warn("virtiofsd exited", "folder", mt.HostPath, "err", err, "stderr", strings.TrimSpace(d.stderr.String()))
		}
		d.release()
		close(d.done)
	}()
	return d, nil
}

// fsIDMap is the user namespace of the daemon of a folder owned by uid
// and gid: the guest's root is the owner, its other users and groups
// the owner's subordinate ids, or else those of jail.User (`smolvm setup`
// gives it some): a guest user N's files belong to the range's start+N-1
// on the host. Without such ids (or when the owner is among them) only
// the guest's root is mapped, and other guest users cannot make files.
func fsIDMap(mt hypervisor.Mount, uid, gid uint32) *jail.IDMap {
	m := &jail.IDMap{UID: uid, GID: gid}
	uids, gids, ok := jail.SubIDs(uid)
	switch {
	case !ok:
		slog.Warn("host folder: no subordinate ids in /etc/subuid and /etc/subgid for its owner or user "+jail.User+
			": only the guest's root can make files there (run 'smolvm setup')", "folder", mt.HostPath, "owner", uid)
	case uids.Holds(uid) || gids.Holds(gid):
		slog.Warn("host folder: its owner is among the subordinate ids it would map the guest's users to: only the guest's root can make files there",
			"folder", mt.HostPath, "owner", uid, "subuids", uids, "subgids", gids)
	default:
		m.SubUIDs, m.SubGIDs = uids, gids
	}
	return m
}

// watchFSDaemons kills the machine when a daemon ends before it: the
// guest's requests to that folder would wait for ever.
func (m *Machine) watchFSDaemons() {
	for i, d := range m.fsd {
		go func() {
			select {
			case <-m.done:
			case <-d.done:
				m.dirMu.Lock()
				m.fsErr = fmt.Errorf("virtiofsd of host folder %s exited: %s", m.cfg.Mounts[i].HostPath, strings.TrimSpace(d.stderr.String()))
				m.dirMu.Unlock()
				_ = m.cmd.Process.Kill()
			}
		}()
	}
}

// stopFSDaemons ends the daemons and waits for them: each has grace to
// end by itself (it does when QEMU hangs up), then it is killed.
func stopFSDaemons(ds []*fsDaemon, grace time.Duration) {
	for _, d := range ds {
		select {
		case <-d.done:
		case <-time.After(grace):
			_ = d.cmd.Process.Kill()
			<-d.done
		}
	}
}

// fsStderr is what daemons that failed said, for QEMU's error.
func fsStderr(ds []*fsDaemon) string {
	var out []string
	for _, d := range ds {
		select {
		case <-d.done:
			if s := strings.TrimSpace(d.stderr.String()); s != "" {
				out = append(out, "virtiofsd: "+s)
			}
		default:
		}
	}
	return strings.Join(out, "; ")
}
