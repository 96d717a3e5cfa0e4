package qemu

import (
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/hypervisor"
)

// console reads the guest's serial console from QEMU through a socket
// pair and keeps it in a capped log (internal/consolelog). The reading
// never stops while QEMU runs, whoever reads the log, so the guest is
// never held up by its console; QEMU does not block on a full socket
// either (its serial port waits, as for a slow line).
type console struct {
	r    *os.File
	log  *consolelog.Log // nil: output discarded
	done chan struct{}   // closed when QEMU's side is gone and all is written
}

// startConsole makes the socket pair and opens the log; qemuEnd is for
// QEMU to inherit (the caller closes it once QEMU has started).
func startConsole(cfg *hypervisor.MachineConfig) (_ *console, qemuEnd *os.File, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("console socket: %w", err)
	}
	_ = syscall.SetNonblock(fds[0], true) // read through Go's poller
	c := &console{r: os.NewFile(uintptr(fds[0]), "console"), done: make(chan struct{})}
	qemuEnd = os.NewFile(uintptr(fds[1]), "console-qemu")
	if cfg.ConsoleLog != "" {
		if c.log, err = consolelog.Open(cfg.ConsoleLog, cfg.ConsoleLogMaxBytes); err != nil {
			c.r.Close()
			qemuEnd.Close()
			return nil, nil, err
		}
	}
	return c, qemuEnd, nil
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

// stop ends the reading (QEMU never started, or its side stays open).
func (c *console) stop() {
	_ = c.r.Close()
	if c.log != nil {
		_ = c.log.Close()
	}
}
