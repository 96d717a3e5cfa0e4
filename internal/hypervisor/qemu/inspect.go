package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// every architecture Linux runs smolvm on).
const userHZ = 100

// Inspect implements hypervisor.Inspector: QEMU's process state and the
// CPU it used over a second (a guest that spins uses a core under TCG, an
// idle or stuck one nothing), its threads' states, the run state, and where each vCPU is: its
// instruction pointer, in kernel or user space, and whether it is halted
// (waiting for an interrupt).
func (m *Machine) Inspect(ctx context.Context) string {
	parts := []string{m.processState(ctx)}
	status, err := m.query(ctx, "query-status", nil)
	if err != nil {
		return strings.Join(append(parts, "run state unknown: "+err.Error()), "; ")
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(status, &st); err == nil {
		parts = append(parts, "run state "+st.Status)
	}
	regs, err := m.query(ctx, "human-monitor-command", map[string]any{"command-line": "info registers -a"})
	if err != nil {
		return strings.Join(append(parts, "registers unknown: "+err.Error()), "; ")
	}
	var text string
	if err := json.Unmarshal(regs, &text); err != nil {
		return strings.Join(append(parts, "registers unknown: "+err.Error()), "; ")
	}
	return strings.Join(append(parts, describeVCPUs(text)...), "; ")
}

// query runs one QMP command, giving up when ctx ends (a QEMU whose main
// loop is stuck never answers; the call is left to end with the process).
func (m *Machine) query(ctx context.Context, cmd string, args any) ([]byte, error) {
	type result struct {
		raw []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var raw json.RawMessage
		err := m.run(cmd, args, &raw)
		ch <- result{raw, err}
	}()
	select {
	case r := <-ch:
		return r.raw, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: no answer: %w", cmd, ctx.Err())
	}
}

// processState reads QEMU's state letter and the CPU it uses over a
// second (less when ctx ends sooner).
func (m *Machine) processState(ctx context.Context) string {
	pid := m.PID()
	state0, cpu0, err := procStat(pid)
	if err != nil {
		return fmt.Sprintf("QEMU pid %d: %v", pid, err)
	}
	t0 := time.Now()
	select {
	case <-ctx.Done():
	case <-time.After(time.Second):
	}
	state, cpu1, err := procStat(pid)
	if err != nil {
		return fmt.Sprintf("QEMU pid %d state %s, then: %v", pid, state0, err)
	}
	return fmt.Sprintf("QEMU pid %d state %s, %.2f s of CPU in %.1f s, threads %s", pid, state, float64(cpu1-cpu0)/userHZ, time.Since(t0).Seconds(), threads(pid))
}

// threads lists the state of each of a process's threads and the kernel
// function it waits in, if any ("S do_sys_poll"): a main loop blocked in
// a write shows here when QMP cannot answer.
func threads(pid int) string {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "unknown: " + err.Error()
	}
	var out []string
	for _, e := range ents {
		state, _, err := readStat(dir + "/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		if b, err := os.ReadFile(dir + "/" + e.Name() + "/wchan"); err == nil && len(b) > 0 && string(b) != "0" {
			state += " " + string(b)
		}
		out = append(out, state)
	}
	return "[" + strings.Join(out, ", ") + "]"
}

// procStat returns a process's state letter and its user and system CPU
// time in USER_HZ ticks.
func procStat(pid int) (string, int64, error) {
	return readStat("/proc/" + strconv.Itoa(pid) + "/stat")
}

// readStat reads a stat file of /proc (a process's or a thread's).
func readStat(path string) (string, int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", 0, err
	}
	// The command name may hold spaces and parentheses: fields start
	// after its last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", 0, fmt.Errorf("cannot read %s", path)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return "", 0, fmt.Errorf("cannot read %s", path)
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return f[0], utime + stime, nil
}

var (
	vcpuRE = regexp.MustCompile(`CPU#(\d+)`)
	ripRE  = regexp.MustCompile(`RIP=([0-9a-f]+)`)
	cplRE  = regexp.MustCompile(`CPL=(\d)`)
	hltRE  = regexp.MustCompile(`HLT=(\d)`)
)

// describeVCPUs turns QEMU's "info registers -a" into one phrase per
// vCPU: where it is and whether it is halted. (A kernel booted through PVH
// runs unrandomised: its addresses are those of /proc/kallsyms in any
// guest of the same kernel.)
func describeVCPUs(text string) []string {
	var out []string
	for _, block := range strings.Split(text, "CPU#")[1:] {
		block = "CPU#" + block
		cpu, rip, cpl, hlt := first(vcpuRE, block), first(ripRE, block), first(cplRE, block), first(hltRE, block)
		if rip == "" {
			continue
		}
		where := "user space at " + rip
		if cpl == "0" {
			where = "kernel at " + rip
		}
		if hlt == "1" {
			where = "halted (waiting for an interrupt), " + where
		}
		out = append(out, "vCPU "+cpu+" "+where)
	}
	if len(out) == 0 {
		return []string{"no vCPU registers in " + strconv.Quote(text)}
	}
	return out
}

func first(re *regexp.Regexp, s string) string {
	if m := re.FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return ""
}
