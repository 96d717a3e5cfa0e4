package qemu

import (
	"os"
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
	state, cpu, err := procStat(os.Getpid())
	if err != nil || state != "R" || cpu < 0 {
		t.Errorf("procStat(self) = %q, %d, %v; want R, a CPU time, nil", state, cpu, err)
	}
	if _, _, err := procStat(-1); err == nil {
		t.Error("procStat of no process: no error")
	}
}
