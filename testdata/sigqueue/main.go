// Command sigqueue queues a signal to a process with rt_sigqueueinfo and
// code SI_QUEUE, as sigqueue(3) does: sigqueue PID SIGNUM. Built by
// TestAgentSurvivesItsGuest and run in the guest against PID 1.
package main

import (
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: sigqueue PID SIGNUM")
		os.Exit(2)
	}
	pid, err1 := strconv.Atoi(os.Args[1])
	sig, err2 := strconv.Atoi(os.Args[2])
	if err1 != nil || err2 != nil {
		fmt.Fprintln(os.Stderr, "sigqueue: PID and SIGNUM are numbers")
		os.Exit(2)
	}
	var info [128]byte // siginfo_t: signo, errno, code, then the sender
	*(*int32)(unsafe.Pointer(&info[0])) = int32(sig)
	*(*int32)(unsafe.Pointer(&info[8])) = -1 // SI_QUEUE
	if _, _, e := unix.RawSyscall(unix.SYS_RT_SIGQUEUEINFO, uintptr(pid), uintptr(sig), uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		fmt.Fprintf(os.Stderr, "sigqueue: rt_sigqueueinfo(%d, %d): %v\n", pid, sig, e)
		os.Exit(1)
	}
}
