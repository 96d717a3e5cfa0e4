package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/network"
)

// SpareOwnerFile in a spare's folder holds the pid of the process that
// made it: cleanup removes the folders of spares whose owner is gone.
const SpareOwnerFile = "owner"

// Spare is a hypervisor started ahead of time for the restore of one
// snapshot: its process is up, the snapshot's memory file mapped, its
// devices built, and its network device connected to a socket the spare
// holds. A VM that claims it only loads the snapshot's device state,
// which spares it the hypervisor's start (about 100 ms under emulation,
// most of a restore's launch). Until it is claimed a spare lives in a
// folder of its own, which Claim moves to the VM's.
type Spare struct {
	dir     string
	mc      hypervisor.MachineConfig
	m       hypervisor.Machine
	netConn net.Conn
}

// PrepareSpare starts a spare for the machine mc describes (Restore set,
// no disks), in a new folder dir: mc's folder, console log and network
// socket are moved there.
func PrepareSpare(ctx context.Context, driver string, mc hypervisor.MachineConfig, dir string) (_ *Spare, err error) {
	d, err := hypervisor.Get(driver)
	if err != nil {
		return nil, err
	}
	if !d.Capabilities().Prelaunch || mc.Restore == nil || len(mc.Disks) > 0 || mc.Channel == hypervisor.ChannelVsock {
		return nil, fmt.Errorf("prelaunch: %w", hypervisor.ErrUnsupported)
	}
	if err := d.Capabilities().Check(&mc); err != nil {
		return nil, fmt.Errorf("prelaunch: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("prelaunch: %w", err)
	}
	sp := &Spare{dir: dir}
	defer func() {
		if err != nil {
			sp.Discard()
		}
	}()
	if err := os.WriteFile(filepath.Join(dir, SpareOwnerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return nil, fmt.Errorf("prelaunch: %w", err)
	}
	sp.mc = relocate(mc, dir, "spare-"+filepath.Base(dir))
	var ln *net.UnixListener
	for _, n := range sp.mc.Net {
		if n.TAP != "" || n.TAPFile != nil {
			return nil, fmt.Errorf("prelaunch of a TAP device: %w", hypervisor.ErrUnsupported)
		}
		if n.StreamSocket != "" && ln == nil {
			// QEMU connects its network device when it starts: hold the
			// connection for the network stack the VM will have.
			if ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: n.StreamSocket, Net: "unix"}); err != nil {
				return nil, fmt.Errorf("prelaunch: %w", err)
			}
			defer ln.Close()
		}
	}
	if sp.m, err = d.Prelaunch(ctx, &sp.mc); err != nil {
		return nil, err
	}
	if ln != nil {
		_ = ln.SetDeadline(time.Now().Add(30 * time.Second))
		if sp.netConn, err = ln.Accept(); err != nil {
			return nil, fmt.Errorf("prelaunch: wait for the network device: %w", err)
		}
	}
	return sp, nil
}

// relocate moves a machine's per-VM paths into dir.
func relocate(mc hypervisor.MachineConfig, dir, id string) hypervisor.MachineConfig {
	mc.ID, mc.Dir, mc.ConsoleLog = id, dir, filepath.Join(dir, ConsoleLog)
	mc.Net = append([]hypervisor.NetDevice(nil), mc.Net...)
	for i := range mc.Net {
		if mc.Net[i].StreamSocket != "" {
			mc.Net[i].StreamSocket = network.SocketPath(dir)
		}
	}
	return mc
}

// Dir is the spare's folder (until a VM claims it).
func (sp *Spare) Dir() string { return sp.dir }

// Alive reports whether the spare's hypervisor still runs.
func (sp *Spare) Alive() bool {
	select {
	case <-sp.m.Done():
		return false
	default:
		return true
	}
}

// Claim gives the spare to the VM whose folder is dir (which may exist,
// empty): the spare's folder becomes dir, and its console log keeps at
// most consoleLogMaxBytes. It returns the machine as the VM's spec must
// describe it.
func (sp *Spare) Claim(dir, id string, consoleLogMaxBytes int64) (hypervisor.MachineConfig, error) {
	_ = os.Remove(dir) // an empty folder made for the VM
	if err := os.Rename(sp.dir, dir); err != nil {
		_ = os.MkdirAll(dir, 0o700) // the VM goes on without the spare
		return hypervisor.MachineConfig{}, fmt.Errorf("claim prelaunched hypervisor: %w", err)
	}
	sp.dir = dir
	sp.m.Move(dir, consoleLogMaxBytes)
	_ = os.Remove(filepath.Join(dir, SpareOwnerFile))
	sp.mc = relocate(sp.mc, dir, id)
	sp.mc.ConsoleLogMaxBytes = consoleLogMaxBytes
	return sp.mc, nil
}

// Discard kills an unclaimed spare and removes its folder, freeing its
// uid once its hypervisor has ended (within a few seconds).
func (sp *Spare) Discard() {
	if sp.m != nil {
		_ = sp.m.Kill()
		select {
		case <-sp.m.Done():
		case <-time.After(5 * time.Second):
		}
	}
	if sp.netConn != nil {
		_ = sp.netConn.Close()
	}
	_ = jail.ReleaseID(sp.dir)
	_ = os.RemoveAll(sp.dir)
}

// RemoveAbandonedSpares removes the spare folders under dir whose owner
// process is gone (its hypervisors died with it).
func RemoveAbandonedSpares(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var removed []string
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(filepath.Join(p, SpareOwnerFile))
		pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
		if err == nil && perr == nil && pid > 0 && !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue // its owner runs
		}
		if jail.ReleaseFolder(p) == nil && os.RemoveAll(p) == nil {
			removed = append(removed, e.Name())
		}
	}
	return removed
}
