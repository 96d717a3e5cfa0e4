package jail

import (
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
)

// BenchmarkStart measures what a jail adds to starting a process: a
// start and wait of /bin/true, plain and in a jail with and without a
// cgroup (the mounts a QEMU's jail has, less its own files).
func BenchmarkStart(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	cs := DetectCgroups()
	for _, mode := range []string{"plain", "jail", "jail+cgroup"} {
		b.Run(mode, func(b *testing.B) {
			root := b.TempDir()
			cpu0 := cpuTime()
			defer func() { b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N)/1e6, "cpu-ms/op") }()
			for i := 0; b.Loop(); i++ {
				cmd := exec.Command("/bin/true")
				cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
				if mode == "plain" {
					if err := cmd.Run(); err != nil {
						b.Fatal(err)
					}
					continue
				}
				j := &Jail{UID: 65534, GID: 65534, Root: root, Writable: []string{b.TempDir()}}
				if mode == "jail+cgroup" && cs.Version() != "" {
					cg, err := cs.CreateCgroup("smolvm-bench-"+strconv.Itoa(os.Getpid()), Limits{MemoryBytes: 1 << 30, CPUs: 1, Pids: 64})
					if err != nil {
						b.Fatal(err)
					}
					j.Cgroup = cg
				}
				release, err := j.Start(cmd)
				if err != nil {
					b.Fatal(err)
				}
				if err := cmd.Wait(); err != nil {
					b.Fatal(err)
				}
				release()
				if j.Cgroup != nil {
					if err := j.Cgroup.Remove(); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// cpuTime is the CPU time of this process and its waited-for children,
// in nanoseconds: unlike wall-clock time, it hardly depends on the
// host's load.
func cpuTime() int64 {
	var self, kids syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &kids)
	var t int64
	for _, ru := range []syscall.Rusage{self, kids} {
		t += ru.Utime.Nano() + ru.Stime.Nano()
	}
	return t
}
