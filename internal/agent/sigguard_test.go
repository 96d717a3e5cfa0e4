//go:build linux && (amd64 || arm64)

package agent

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// queueToSelf queues sig to the calling thread with code SI_QUEUE, as
// rt_sigqueueinfo from another process would: it is delivered as the
// syscall returns.
func queueToSelf(t *testing.T, sig syscall.Signal) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var info [128]byte // siginfo_t: signo, errno, code
	*(*int32)(unsafe.Pointer(&info[0])) = int32(sig)
	*(*int32)(unsafe.Pointer(&info[8])) = -1 // SI_QUEUE
	if _, _, e := unix.RawSyscall6(unix.SYS_RT_TGSIGQUEUEINFO, uintptr(unix.Getpid()), uintptr(unix.Gettid()), uintptr(sig), uintptr(unsafe.Pointer(&info[0])), 0, 0); e != 0 {
		t.Fatalf("rt_tgsigqueueinfo %v: %v", sig, e)
	}
}

// TestSigGuard: with the guard, fault signals queued with SI_QUEUE are
// dropped and a real fault still panics (recoverably); without it (the
// runtime and signal.Notify alone) a queued SIGSEGV ends the process.
func TestSigGuard(t *testing.T) {
	if mode := os.Getenv("SMOLVM_SIGGUARD_CHILD"); mode != "" {
		if mode == "guarded" {
			ignoreSentSignals()
		} else {
			ignoreSentSignalsWithoutGuard()
		}
		sigs := guardedSignals
		if mode != "guarded" {
			sigs = []syscall.Signal{syscall.SIGSEGV}
		}
		for _, sig := range sigs {
			queueToSelf(t, sig)
		}
		var p *[1 << 10]int
		func() {
			defer func() {
				err, _ := recover().(error)
				var re runtime.Error
				if !errors.As(err, &re) || !strings.Contains(err.Error(), "nil pointer dereference") {
					t.Fatalf("a nil dereference recovered %v; want the runtime's panic", err)
				}
			}()
			p[7] = 1
		}()
		_, _ = os.Stdout.WriteString("alive\n")
		return
	}
	for _, mode := range []string{"guarded", "unguarded"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSigGuard$", "-test.v")
		cmd.Env = append(os.Environ(), "SMOLVM_SIGGUARD_CHILD="+mode)
		out, err := cmd.CombinedOutput()
		alive := err == nil && strings.Contains(string(out), "alive")
		if mode == "guarded" && !alive {
			t.Errorf("guarded: queued fault signals ended the process: %v\n%s", err, out)
		}
		if mode == "unguarded" && alive {
			t.Errorf("unguarded: a queued SIGSEGV was survived; the test no longer shows what the guard is for\n%s", out)
		}
	}
}
