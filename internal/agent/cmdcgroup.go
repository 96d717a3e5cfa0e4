package agent

// A cgroup per command. The commands' cgroup bounds all commands together
// (pids.max); within it each command starts in a cgroup of its own,
// smolvm-commands/cN, whose pids.max is cmdOwnShare of that: a command
// that forks without bound (a fork bomb left running in the background,
// its command long returned) meets its own limit, and the next command
// still has the rest to start in. Making a cgroup costs about 2 ms in an
// emulated guest and removing one about 2.6 ms, so they are kept: one
// whose processes are all gone goes back to a free list and serves the
// next command (a command's background processes keep theirs until they
// exit: a browser started by a command keeps its budget). At most
// cmdCgroupsMax exist; past that, commands start in the shared cgroup
// smolvm-commands/shared, under the commands' limit only.
//
// With the cpu controller on, each command's cgroup has the same weight, so
// that the CPU is shared by command, not by process: a bomb's thousands of
// processes leave the next command half a vCPU rather than a few
// thousandths of one.
//
// cgroup v2 lets no process live in a cgroup that hands controllers to
// its children, hence the shared cgroup rather than smolvm-commands itself.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

const (
	// cmdOwnShare: a command's own cgroup may hold this share of the
	// commands' process limit (three quarters), leaving the rest to the
	// others.
	cmdOwnShareNum, cmdOwnShareDen = 3, 4
	// cmdCgroupsMax bounds the cgroups made for commands.
	cmdCgroupsMax = 256
)

type cmdCgroup struct {
	dir    string
	fd     int
	events int // its cgroup.events, kept open: see populated
}

// cmdCgroups is the pool of the commands' own cgroups.
type cmdCgroups struct {
	parent  string
	pidsMax int // each one's pids.max; 0: none
	mu      sync.Mutex
	made    int
	free    []*cmdCgroup
	busy    []*cmdCgroup // released while processes of theirs still ran
}

// makePool hands the pids controller to the commands' cgroups and makes
// the shared one.
func (l *CommandLimits) makePool(dir string) error {
	if l.PidsMax > 0 {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+pids"), 0); err != nil {
			return fmt.Errorf("enable the pids controller for the commands' own cgroups: %w", err)
		}
		l.CommandPidsMax = l.PidsMax * cmdOwnShareNum / cmdOwnShareDen
	}
	if l.cpu {
		// Each command's cgroup weighs the same: a fork bomb's thousands
		// of processes get one command's share of the CPU, not nearly all.
		_ = os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+cpu"), 0)
	}
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create the shared commands' cgroup: %w", err)
	}
	fd, err := unix.Open(shared, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open the shared commands' cgroup: %w", err)
	}
	l.sharedFD = fd
	l.pool = &cmdCgroups{parent: dir, pidsMax: l.CommandPidsMax}
	return nil
}

// acquire returns a cgroup with no process in it, or nil when none can
// be had.
func (p *cmdCgroups) acquire() *cmdCgroup {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) == 0 {
		p.reclaim()
	}
	if n := len(p.free); n > 0 {
		c := p.free[n-1]
		p.free = p.free[:n-1]
		return c
	}
	if p.made >= cmdCgroupsMax {
		return nil
	}
	c, err := p.make(filepath.Join(p.parent, "c"+strconv.Itoa(p.made)))
	if err != nil {
		return nil
	}
	p.made++
	return c
}

func (p *cmdCgroups) make(dir string) (*cmdCgroup, error) {
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	if p.pidsMax > 0 {
		if err := writeLimit(dir, "pids.max", int64(p.pidsMax)); err != nil {
			return nil, err
		}
	}
	events, err := unix.Open(filepath.Join(dir, "cgroup.events"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(events)
		return nil, err
	}
	return &cmdCgroup{dir: dir, fd: fd, events: events}, nil
}

// release takes back a command's cgroup: free when its processes are
// gone, busy until they are.
func (p *cmdCgroups) release(c *cmdCgroup) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.populated() {
		p.busy = append(p.busy, c)
	} else {
		p.free = append(p.free, c)
	}
}

// reclaim frees the busy cgroups whose processes have all exited.
func (p *cmdCgroups) reclaim() {
	busy := p.busy[:0]
	for _, c := range p.busy {
		if c.populated() {
			busy = append(busy, c)
		} else {
			p.free = append(p.free, c)
		}
	}
	clear(p.busy[len(busy):])
	p.busy = busy
}

// populated says whether the cgroup (or one below it) holds a process; an
// unreadable cgroup.events counts as populated (not reused). It is one
// pread of the file kept open: opening it by path, reading and closing it
// (os.ReadFile) cost about 4 ms a command in an emulated guest, in the
// agent's hot path (in-guest A/B of testdata/spawnbench, 600 spawns each,
// medians 31.2 against 27.3 ms; none at all, 26.8 ms).
func (c *cmdCgroup) populated() bool {
	var buf [128]byte
	n, err := unix.Pread(c.events, buf[:], 0)
	if err != nil || n <= 0 {
		return true
	}
	for _, l := range strings.Split(string(buf[:n]), "\n") {
		if v, ok := strings.CutPrefix(l, "populated "); ok {
			return strings.TrimSpace(v) != "0"
		}
	}
	return true
}
