package agent

// Keeping room for the agent. As PID 1 the agent is the guest: if it dies,
// the kernel panics. A command that forks without bound or eats the
// guest's memory must therefore exhaust a budget of its own, not the
// guest's. Every command is started in one cgroup (cgroup v2), created at
// boot next to the agent, which stays in the root cgroup:
//
//	/sys/fs/cgroup/smolvm-commands   pids.max, memory.max
//
// Processes are started in it by clone3 with CLONE_INTO_CGROUP, so no
// process of a command ever runs outside it, not even for an instant.
// pids.max leaves cmdPidsReserve tasks of the kernel's limits (pid_max and
// threads-max, the count of all tasks the memory allows) to the agent and
// the kernel's threads: the Go runtime dies when it cannot make a thread.
// memory.max leaves cmdMemReserve of the memory available at boot: a
// memory hog meets the cgroup's OOM killer, which picks among the
// commands' processes only. The agent's oom_score_adj is -999 should the
// whole guest run short (not -1000, which the kernel never kills: a
// command's child forked before its reset would inherit it and hang at
// memory.max instead of being killed); a started command's is set back to
// 0, so that it is the OOM killer's candidate before the agent.
//
// A kernel without cgroup2 or without the pids or memory controller gets
// no limits for that resource; the agent logs it and serves. (Resource
// limits, setrlimit, are no substitute: RLIMIT_NPROC does not bind root.)

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	cgroupRoot = "/sys/fs/cgroup"
	// commandsCgroup is the cgroup of every command, below cgroupRoot.
	commandsCgroup = "smolvm-commands"
	// cmdPidsReserve is the share of the task limit kept from the
	// commands, with cmdPidsMin as its floor.
	cmdPidsReserve = 8 // one eighth
	cmdPidsMin     = 256
	// cmdMemReserve is the share of the memory available at boot kept
	// from the commands, with cmdMemMin as its floor.
	cmdMemReserve = 8 // one eighth
	cmdMemMin     = 32 << 20
)

// CommandLimits is how the agent keeps its commands from starving it.
type CommandLimits struct {
	Cgroup  string // the commands' cgroup; "" when there is none
	fd      int    // Cgroup's directory; -1 when there is none
	PidsMax int    // 0: no limit
	MemMax  int64  // 0: no limit
	// CommandPidsMax is the limit of one command's own cgroup (0: none,
	// the commands share PidsMax).
	CommandPidsMax int
	pool           *cmdCgroups
	sharedFD       int  // the shared cgroup, when a command cannot have its own
	cpu            bool // the cpu controller is on below the root
	// oomProtected: the agent's oom_score_adj is -999, and a command's
	// must be set back.
	oomProtected bool
}

// setupCommandLimits protects the agent from the OOM killer and creates
// the commands' cgroup with its limits. Whatever fails is logged; the
// commands then run without that limit.
func setupCommandLimits(log *slog.Logger) *CommandLimits {
	l := &CommandLimits{fd: -1, sharedFD: -1}
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-999"), 0); err != nil {
		log.Warn("protect the agent from the OOM killer", "err", err)
	} else {
		l.oomProtected = true
	}
	if err := l.makeCgroup(log); err != nil {
		log.Warn("commands run without process and memory limits: a fork bomb can kill the guest", "err", err)
	}
	return l
}

func (l *CommandLimits) makeCgroup(log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(cgroupRoot, &st); err != nil {
		return fmt.Errorf("no cgroup2 file system: %w", err)
	} else if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("no cgroup2 file system on %s", cgroupRoot)
	}
	avail, _ := readString(filepath.Join(cgroupRoot, "cgroup.controllers"))
	var enable []string
	for _, c := range []string{"pids", "memory"} {
		if slices.Contains(strings.Fields(avail), c) {
			enable = append(enable, "+"+c)
		} else {
			log.Warn("cgroup controller missing from the kernel: commands run without its limit", "controller", c)
		}
	}
	if len(enable) > 0 {
		if err := os.WriteFile(filepath.Join(cgroupRoot, "cgroup.subtree_control"), []byte(strings.Join(enable, " ")), 0); err != nil {
			log.Warn("enable cgroup controllers", "controllers", enable, "err", err)
		}
	}
	// The cpu controller shares the CPU by cgroup, not by process: the
	// agent against all commands, and each command against the others
	// (see cmdcgroup.go), however many processes one of them forks.
	l.cpu = slices.Contains(strings.Fields(avail), "cpu") &&
		os.WriteFile(filepath.Join(cgroupRoot, "cgroup.subtree_control"), []byte("+cpu"), 0) == nil
	dir := filepath.Join(cgroupRoot, commandsCgroup)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create the commands' cgroup: %w", err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open the commands' cgroup: %w", err)
	}
	l.Cgroup, l.fd = dir, fd
	if n := taskLimit(); n > 0 && slices.Contains(enable, "+pids") {
		l.PidsMax = n - max(n/cmdPidsReserve, cmdPidsMin)
		if err := writeLimit(dir, "pids.max", int64(l.PidsMax)); err != nil {
			log.Warn("limit the commands' processes", "err", err)
			l.PidsMax = 0
		}
	}
	if avail := memAvailable(); avail > 0 && slices.Contains(enable, "+memory") {
		l.MemMax = avail - max(avail/cmdMemReserve, cmdMemMin)
		if err := writeLimit(dir, "memory.max", l.MemMax); err != nil {
			log.Warn("limit the commands' memory", "err", err)
			l.MemMax = 0
		}
	}
	if err := l.makePool(dir); err != nil {
		// Commands go on sharing the commands' cgroup: one that forks
		// without bound leaves the next none until it is ended.
		log.Warn("commands share one process budget", "err", err)
		l.CommandPidsMax, l.pool = 0, nil
		l.sharedFD = l.fd
	}
	log.Debug("commands' cgroup ready", "path", dir, "pids_max", l.PidsMax, "command_pids_max", l.CommandPidsMax, "memory_max", l.MemMax, "uptime", uptime())
	return nil
}

func writeLimit(dir, file string, v int64) error {
	if v <= 0 {
		return fmt.Errorf("%s: nothing left for the commands (%d)", file, v)
	}
	return os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(v, 10)), 0)
}

// taskLimit is the number of tasks the kernel allows in all: the lower of
// pid_max and threads-max.
func taskLimit() int {
	n := 0
	for _, f := range []string{"/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"} {
		s, err := readString(f)
		if err != nil {
			continue
		}
		if v, err := strconv.Atoi(s); err == nil && v > 0 && (n == 0 || v < n) {
			n = v
		}
	}
	return n
}

// memAvailable is MemAvailable of /proc/meminfo in bytes, or 0.
func memAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

func readString(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}

// apply makes a command start in a cgroup of its own below the
// commands' cgroup (or, when there is none to be had, in the shared one)
// and returns it, for release once the command is done with.
func (l *CommandLimits) apply(sys *syscall.SysProcAttr) *cmdCgroup {
	if l == nil || l.fd < 0 {
		return nil
	}
	if c := l.pool.acquire(); c != nil {
		sys.UseCgroupFD, sys.CgroupFD = true, c.fd
		return c
	}
	sys.UseCgroupFD, sys.CgroupFD = true, l.sharedFD
	return nil
}

// release gives a command's cgroup back (nil is none).
func (l *CommandLimits) release(c *cmdCgroup) {
	if l != nil && c != nil {
		l.pool.release(c)
	}
}

// started makes a started command a candidate of the OOM killer again: it
// inherited the agent's -999. Its children forked before this keep -999,
// which the OOM killer still weighs by size among the commands.
func (l *CommandLimits) started(pid int) {
	if l == nil || !l.oomProtected {
		return
	}
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	_, _ = unix.Write(fd, []byte("0"))
	unix.Close(fd)
}

// explain names the limit a command that could not start ran into.
func (l *CommandLimits) explain(err error) error {
	if l == nil || l.PidsMax == 0 || !errors.Is(err, syscall.EAGAIN) {
		return err
	}
	return fmt.Errorf("%w: the guest's commands have reached their limit of %d processes (pids.max of %s): a command forks without bound; end it (or stop the VM)", err, l.PidsMax, l.Cgroup)
}
