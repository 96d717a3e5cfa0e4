package agent

import (
	"log/slog"
	"sync"
	"time"
)

// initStepWarn is how long an init step of PID 1 may run before the
// console says which one it is: a boot takes seconds even under a loaded
// host's emulation, and the kernel boots quiet, so a boot that hangs in
// the agent's init (a module's probe, the network's setup) would
// otherwise leave the console empty.
const initStepWarn = 10 * time.Second

// stepWatch names, every interval until done, the init step still
// running. It costs one timer during init and nothing after.
type stepWatch struct {
	mu    sync.Mutex
	step  string
	since time.Time
	stop  chan struct{}
	once  sync.Once
}

func watchSteps(log *slog.Logger, every time.Duration) *stepWatch {
	w := &stepWatch{step: "set up the environment", since: time.Now(), stop: make(chan struct{})}
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				w.mu.Lock()
				step, since := w.step, w.since
				w.mu.Unlock()
				log.Warn("init: a step is slow", "step", step, "for", time.Since(since).Round(time.Second), "uptime", uptime())
			}
		}
	}()
	return w
}

// enter records the step that starts now.
func (w *stepWatch) enter(step string) {
	w.mu.Lock()
	w.step, w.since = step, time.Now()
	w.mu.Unlock()
}

// done stops the watch.
func (w *stepWatch) done() { w.once.Do(func() { close(w.stop) }) }
