//go:build linux && (amd64 || arm64)

package agent

// A guard in front of the Go runtime's handlers of the fault signals.
// The runtime takes a SIGSEGV, SIGBUS or SIGFPE (and SIGILL, SIGTRAP,
// SIGSTKFLT, SIGSYS) for a fault of its own unless the signal's code says
// another process sent it, and it knows only SI_USER (kill) and SI_TKILL
// (tgkill) as such. A signal queued with rt_sigqueueinfo carries SI_QUEUE
// (or any other code below one the sender picks), which the runtime reads
// as a fault: it panics or throws, and the agent, PID 1, dies with the
// guest. The kernel lets no process but the receiver forge a code above
// zero, and gives every fault it raises one (SEGV_MAPERR, BUS_ADRERR,
// SI_KERNEL, ...): so the guard, an assembly handler the kernel calls in
// place of the runtime's, returns at once for a code of zero or below and
// jumps to the runtime's handler, with the registers and stack the kernel
// set, for any other. A real fault of the agent therefore still panics as
// before (nil pointer dereferences included); a sent one is dropped.

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// guardedSignals are the signals the runtime may take for a fault.
var guardedSignals = []syscall.Signal{
	syscall.SIGILL, syscall.SIGTRAP, syscall.SIGABRT, syscall.SIGBUS, syscall.SIGFPE,
	syscall.SIGSEGV, syscall.SIGSTKFLT, syscall.SIGSYS,
}

// sigGuardNext is the runtime's handler of each guarded signal, where
// sigGuard jumps for a fault; read by assembly only.
var sigGuardNext [65]uintptr

// sigGuard is the guard (sigguard_*.s): entered by the kernel as a C
// signal handler, never called from Go.
//
//lint:ignore U1000 the kernel enters it, at the address sigGuardPC gives
func sigGuard()

// sigGuardPC is sigGuard's address.
func sigGuardPC() uintptr

// kernelSigaction is struct sigaction as rt_sigaction(2) reads it on
// amd64 and arm64.
type kernelSigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

// guardFaultSignals puts sigGuard in front of the runtime's handler of
// each guarded signal, keeping its flags, mask and restorer. Called once,
// before any other goroutine could change a handler.
func guardFaultSignals() error {
	for _, sig := range guardedSignals {
		var old kernelSigaction
		if _, _, e := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), 0, uintptr(unsafe.Pointer(&old)), 8, 0, 0); e != 0 {
			return fmt.Errorf("read the handler of %v: %w", sig, e)
		}
		if old.handler == 0 || old.handler == 1 || old.handler == sigGuardPC() { // SIG_DFL, SIG_IGN, done
			continue
		}
		sigGuardNext[sig] = old.handler
		act := old
		act.handler = sigGuardPC()
		if _, _, e := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0); e != 0 {
			return fmt.Errorf("guard the handler of %v: %w", sig, e)
		}
	}
	return nil
}
