package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/smolvm/smolvm/internal/hostcap"
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
func SparesDir(home string) string { return hostcap.SparesDir(home) }

// SpareRoom runs record, which makes a spare of memMiB of guest memory
// count against the host's capacity (hostcap.RecordSpare), when the
// host has room for it with every VM and spare counted, under the lock
// that makes the count and the record one step (VMConfig.SpareRoom);
// else it fails with ErrCapacity. A spare only uses room no VM needs.
type SpareRoom func(ctx context.Context, memMiB int, record func() error) error

// spareWatch is how often a ready spare checks that it still counts: a
// create that needed its room took it off the count, and it ends then.
const spareWatch = 500 * time.Millisecond

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
// snapshot) in the background, unless one is ready or being made, or the
// host's capacity has no room for it (room; nil: no check).
func Prelaunch(home, snapshot, driver string, mc hypervisor.MachineConfig, room SpareRoom, log *slog.Logger) {
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
			go makeSpare(k, done, home, snapshot, driver, mc, room, log)
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

// makeSpare starts the spare for key k, if the host has room for it,
// and closes done.
func makeSpare(k string, done chan struct{}, home, snapshot, driver string, mc hypervisor.MachineConfig, room SpareRoom, log *slog.Logger) {
	defer close(done)
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	dir := filepath.Join(SparesDir(home), hex.EncodeToString(b))
	record := func() error { return hostcap.RecordSpare(dir, mc.MemoryMiB) }
	if room == nil {
		room = func(_ context.Context, _ int, record func() error) error { return record() }
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := room(ctx, mc.MemoryMiB, record); err != nil {
		_ = os.RemoveAll(dir)
		spares.Lock()
		delete(spares.making, k)
		spares.Unlock()
		log.Debug("no hypervisor prelaunched: the host has no room for it beside its VMs", "err", err)
		return
	}
	sp, err := supervisor.PrepareSpare(ctx, driver, mc, dir)
	spares.Lock()
	defer spares.Unlock()
	delete(spares.making, k)
	switch {
	case err != nil:
		_ = os.RemoveAll(dir) // a failure before the spare had its folder
		log.Debug("prelaunching a hypervisor failed; the next VM starts its own", "err", err)
	case spares.ready[k] != nil || !hostcap.SpareRecorded(dir):
		sp.Discard() // one is ready already, or a create reclaimed its room
	default:
		spares.ready[k] = sp
		go watchSpare(k, sp, dir)
		log.Debug("hypervisor prelaunched for the next restore", "snapshot", snapshot)
	}
}

// watchSpare ends ready spare sp (key k) once it no longer counts (a
// create reclaimed its room) or its hypervisor died, unless it was taken
// or discarded first.
func watchSpare(k string, sp *supervisor.Spare, dir string) {
	t := time.NewTicker(spareWatch)
	defer t.Stop()
	for range t.C {
		spares.Lock()
		if spares.ready[k] != sp {
			spares.Unlock()
			return
		}
		if hostcap.SpareRecorded(dir) && sp.Alive() {
			spares.Unlock()
			continue
		}
		delete(spares.ready, k)
		spares.Unlock()
		sp.Discard()
		return
	}
}

// ReclaimSpare ends this process's ready spare in folder dir at once (a
// create took its room; see SpareRoom), if it is still unclaimed.
func ReclaimSpare(dir string) {
	spares.Lock()
	var sp *supervisor.Spare
	for k, s := range spares.ready {
		if s.Dir() == dir {
			sp = s
			delete(spares.ready, k)
			break
		}
	}
	spares.Unlock()
	if sp != nil {
		// Killed at once; the wait for its end is not the create's (it
		// holds the host folder's lock).
		go sp.Discard()
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
