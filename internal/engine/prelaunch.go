package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/smolvm/smolvm/internal/hypervisor"
	"github.com/smolvm/smolvm/internal/supervisor"
)

// Prelaunched hypervisors (Config.Prelaunch). A restore of the warm
// snapshot spends about 100 ms under emulation starting QEMU, before any
// of the snapshot is loaded: the process, its libraries and the device
// models it registers. A program that creates VM after VM (a server, a
// benchmark) can pay that ahead of time: after each restore of a warm
// snapshot with Prelaunch set, one QEMU for the next VM of that shape is
// started in the background (after prelaunchDelay, so as not to slow the
// new VM's first command), in a folder of its own under
// $SMOLVM_HOME/spares, with the snapshot's memory mapped and its network
// device connected, and the next New claims it. The spare belongs to
// this process: its QEMU dies with the process (and Cleanup removes the
// folder then), and DiscardPrelaunched ends it earlier.

// SparesDir is where unclaimed spares live.
func SparesDir(home string) string { return filepath.Join(home, "spares") }

var spares = struct {
	sync.Mutex
	ready  map[string]*supervisor.Spare // by home and warm snapshot
	making map[string]chan struct{}     // closed when the spare is made (or failed)
	starts map[string]pendingSpare      // spares not started yet (prelaunchDelay)
}{ready: map[string]*supervisor.Spare{}, making: map[string]chan struct{}{}, starts: map[string]pendingSpare{}}

// pendingSpare is a spare waiting for prelaunchDelay: start starts it now,
// cancel drops it; whichever comes first (or the timer) wins.
type pendingSpare struct{ start, cancel func() }

// prelaunchDelay is how long a spare waits before it starts: a program
// that has just made a VM usually runs a command in it at once, and on a
// machine with few CPUs a QEMU starting beside it would slow that command
// down (under emulation the first command after a restore took 140–170 ms
// with the spare starting at once, 85–100 ms without). WaitPrelaunched
// starts a waiting spare at once.
const prelaunchDelay = 150 * time.Millisecond

func spareKey(home, snapshot string) string { return home + "\x00" + snapshot }

// TakeSpare returns the ready spare for a warm snapshot, if there is one.
func TakeSpare(home, snapshot string) *supervisor.Spare {
	spares.Lock()
	defer spares.Unlock()
	k := spareKey(home, snapshot)
	sp := spares.ready[k]
	delete(spares.ready, k)
	if sp != nil && !sp.Alive() {
		sp.Discard()
		return nil
	}
	return sp
}

// Prelaunch starts a spare like mc (a VM just restored from the warm
// snapshot) in the background, unless one is ready or being made.
func Prelaunch(home, snapshot, driver string, mc hypervisor.MachineConfig, log *slog.Logger) {
	k := spareKey(home, snapshot)
	spares.Lock()
	if spares.ready[k] != nil || spares.making[k] != nil {
		spares.Unlock()
		return
	}
	done := make(chan struct{})
	spares.making[k] = done
	var once sync.Once
	start := func() {
		once.Do(func() {
			spares.Lock()
			delete(spares.starts, k)
			spares.Unlock()
			go makeSpare(k, done, home, snapshot, driver, mc, log)
		})
	}
	cancel := func() {
		once.Do(func() {
			spares.Lock()
			delete(spares.starts, k)
			delete(spares.making, k)
			spares.Unlock()
			close(done)
		})
	}
	spares.starts[k] = pendingSpare{start, cancel}
	time.AfterFunc(prelaunchDelay, start)
	spares.Unlock()
}

// makeSpare starts the spare for key k and closes done.
func makeSpare(k string, done chan struct{}, home, snapshot, driver string, mc hypervisor.MachineConfig, log *slog.Logger) {
	defer close(done)
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	sp, err := supervisor.PrepareSpare(context.Background(), driver, mc, filepath.Join(SparesDir(home), hex.EncodeToString(b)))
	spares.Lock()
	defer spares.Unlock()
	delete(spares.making, k)
	switch {
	case err != nil:
		log.Debug("prelaunching a hypervisor failed; the next VM starts its own", "err", err)
	case spares.ready[k] != nil:
		sp.Discard()
	default:
		spares.ready[k] = sp
		log.Debug("hypervisor prelaunched for the next restore", "snapshot", snapshot)
	}
}

func pendingSpares() []pendingSpare {
	spares.Lock()
	defer spares.Unlock()
	var ps []pendingSpare
	for _, p := range spares.starts {
		ps = append(ps, p)
	}
	return ps
}

// WaitPrelaunched waits until the hypervisors this process is starting
// ahead of time (Config.Prelaunch) are up or have failed.
func WaitPrelaunched(ctx context.Context) error {
	for _, p := range pendingSpares() {
		p.start() // now, not after prelaunchDelay
	}
	for {
		spares.Lock()
		var wait chan struct{}
		for _, c := range spares.making {
			wait = c
			break
		}
		spares.Unlock()
		if wait == nil {
			return nil
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// DiscardPrelaunched ends the hypervisors this process started ahead of
// time (Config.Prelaunch) and removes their folders. VMs that claimed one
// are not affected.
func DiscardPrelaunched(ctx context.Context) error {
	for _, p := range pendingSpares() {
		p.cancel() // not started: nothing to end
	}
	err := WaitPrelaunched(ctx)
	spares.Lock()
	defer spares.Unlock()
	for k, sp := range spares.ready {
		sp.Discard()
		delete(spares.ready, k)
	}
	return err
}

// LiveSpares counts this process's prelaunched hypervisors that are ready
// and still run (for tests).
func LiveSpares() int {
	spares.Lock()
	defer spares.Unlock()
	n := 0
	for _, sp := range spares.ready {
		if sp.Alive() {
			n++
		}
	}
	return n
}
