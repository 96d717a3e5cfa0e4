package qemu

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/hypervisor"
)

// console reads the guest's serial console from QEMU through a pipe and
// keeps it in a capped log (internal/consolelog). The reading never stops
// while QEMU runs, whoever reads the log, so the guest is not held up by
// its console. A pipe, not a socket: the emulated serial port writes a
// byte at a time, which a pipe gathers in its buffer, while a unix socket
// makes a message of each (its buffer held a few hundred bytes, stalling
// the guest, and reading them cost 4 µs a byte).
type console struct {
	r    *os.File
	log  *consolelog.Log // nil: output discarded
	done chan struct{}   // closed when QEMU's side is gone and all is written
}

// startConsole makes the pipe and opens the log; qemuEnd is for QEMU to
// inherit (the caller closes it once QEMU has started).
func startConsole(cfg *hypervisor.MachineConfig) (_ *console, qemuEnd *os.File, err error) {
	// Blocking, outside Go's poller: the poller would wake on every byte
	// QEMU writes (edge-triggered epoll), even while the reader pauses
	// (a 2.5 MiB flood: 6,500 wakeups a second, 7 s of CPU).
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("console pipe: %w", err)
	}
	r, w := os.NewFile(uintptr(fds[0]), "console"), os.NewFile(uintptr(fds[1]), "console-qemu")
	// Room for a burst while the reader pauses (consolelog.Drain).
	_, _ = unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, 256<<10)
	c := &console{r: r, done: make(chan struct{})}
	if cfg.ConsoleLog != "" {
		if c.log, err = consolelog.Open(cfg.ConsoleLog, cfg.ConsoleLogMaxBytes); err != nil {
			r.Close()
			w.Close()
			return nil, nil, err
		}
	}
	return c, w, nil
}

// drain copies the console into the log until QEMU's side closes.
func (c *console) drain() {
	defer close(c.done)
	defer c.r.Close()
	if c.log == nil {
		_, _ = io.Copy(io.Discard, c.r)
		return
	}
	c.log.Drain(c.r)
}

// stop closes the pipe and the log of a console whose QEMU never started
// (a blocked read would hold up the close).
func (c *console) stop() {
	_ = c.r.Close()
	if c.log != nil {
		_ = c.log.Close()
	}
}
