package qemu

import (
	"os"
	"runtime"
	"strings"
	"testing"
)

// Two vCPUs as QEMU's "info registers -a" prints them (trimmed): one
// halted in the kernel, one running user code.
const twoVCPUs = `CPU#0
RAX=0000000000000020 RBX=ffff888003c54d80 RCX=0000000000000002 RDX=0000000000000001
R8 =ffffffff82002301 R9 =ffffffff82002302 R10=ffff888003c4ceb0 R11=0000000000000000
RIP=ffffffff8107e980 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CPU#1
RAX=0000000000000000 RBX=000000c000012345 RCX=0000000000000000 RDX=0000000000000000
RIP=000000000043c280 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
`

func TestDescribeVCPUs(t *testing.T) {
	got := describeVCPUs(twoVCPUs)
	want := []string{
		"vCPU 0 halted (waiting for an interrupt), kernel at ffffffff8107e980",
		"vCPU 1 user space at 000000000043c280",
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("describeVCPUs = %q, want %q", got, want)
	}
	if got := describeVCPUs("Error: no CPU"); len(got) != 1 || !strings.Contains(got[0], "no vCPU registers") {
		t.Errorf("describeVCPUs of no registers = %q", got)
	}
}

func TestProcStat(t *testing.T) {
	// The process's state is its main thread's, which may wait while
	// this one runs.
	state, cpu, err := procStat(os.Getpid())
	if err != nil || len(state) != 1 || cpu < 0 {
		t.Errorf("procStat(self) = %q, %d, %v; want a state letter, a CPU time, nil", state, cpu, err)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if state, _, err := readStat("/proc/thread-self/stat"); err != nil || state != "R" {
		t.Errorf("this thread's state = %q, %v; want R", state, err)
	}
	if _, _, err := procStat(-1); err == nil {
		t.Error("procStat of no process: no error")
	}
	// This test's thread runs (where the others wait depends on the
	// kernel's wchan).
	if got := threads(os.Getpid()); !strings.HasPrefix(got, "[R") && !strings.Contains(got, ", R") {
		t.Errorf("threads(self) = %q, want this running thread among them", got)
	}
}
