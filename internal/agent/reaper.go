package agent

import (
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper collects exit statuses of child processes.
//
// There is exactly one Reaper per process. It is driven by SIGCHLD and
// dispatches the status of every process the agent started (registered with
// Start) to a channel. Processes are started under the reaper's lock and
// registered before the lock is released, so a child that exits before its
// registration is complete cannot be lost: the reaper takes the same lock
// before looking up a reaped pid.
//
// In "reap all" mode (PID 1, or a child subreaper) the reaper calls
// wait4(-1, WNOHANG) in a loop and silently reaps orphans it did not start.
// That mode steals exit statuses from os/exec, so nothing else in the agent
// may use exec.Cmd.Wait. Otherwise (a normal process, e.g. a test binary that
// may use os/exec elsewhere) it only waits for the pids it registered.
type Reaper struct {
	all bool

	mu      sync.Mutex
	waiters map[int]chan<- syscall.WaitStatus

	sig  chan os.Signal
	stop chan struct{}
	once sync.Once
}

var (
	reaperMu     sync.Mutex
	reaperGlobal *Reaper
)

// SharedReaper returns the process-wide reaper, starting it on first use.
// reapAll selects the wait4(-1) mode; it is honoured only on the first call.
func SharedReaper(reapAll bool) *Reaper {
	reaperMu.Lock()
	defer reaperMu.Unlock()
	if reaperGlobal == nil {
		reaperGlobal = newReaper(reapAll)
	}
	return reaperGlobal
}

func newReaper(all bool) *Reaper {
	r := &Reaper{
		all:     all,
		waiters: make(map[int]chan<- syscall.WaitStatus),
		sig:     make(chan os.Signal, 1),
		stop:    make(chan struct{}),
	}
	signal.Notify(r.sig, syscall.SIGCHLD)
	go r.loop()
	return r
}

// ReapsAll reports whether the reaper reaps every child, not just its own.
func (r *Reaper) ReapsAll() bool { return r.all }

// Start forks and execs a process and returns its pid and a channel that
// receives its wait status exactly once.
func (r *Reaper) Start(argv0 string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	ch := make(chan syscall.WaitStatus, 1)
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(argv0, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	r.waiters[pid] = ch
	return pid, ch, nil
}

func (r *Reaper) loop() {
	for {
		select {
		case <-r.stop:
			return
		case <-r.sig:
		}
		if r.all {
			r.reapAll()
		} else {
			r.reapRegistered()
		}
	}
}

func (r *Reaper) reapAll() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ws.Stopped() || ws.Continued() {
			continue
		}
		r.mu.Lock()
		ch, ok := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()
		if ok {
			ch <- ws
		}
	}
}

func (r *Reaper) reapRegistered() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for pid, ch := range r.waiters {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		for errors.Is(err, syscall.EINTR) {
			got, err = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
		switch {
		case errors.Is(err, syscall.ECHILD):
			// Someone else reaped it; report an unknown status rather than hang.
			delete(r.waiters, pid)
			ch <- syscall.WaitStatus(0xff << 8)
		case err != nil || got != pid:
		case ws.Stopped() || ws.Continued():
		default:
			delete(r.waiters, pid)
			ch <- ws
		}
	}
}

// Close stops the reaper goroutine.
func (r *Reaper) Close() {
	r.once.Do(func() {
		signal.Stop(r.sig)
		close(r.stop)
	})
}

// becomeSubreaper makes this process adopt orphaned descendants, so a reaper
// in reap-all mode collects them like PID 1 would.
func becomeSubreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}
