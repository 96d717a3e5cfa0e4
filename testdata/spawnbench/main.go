// Command spawnbench measures, inside a guest, what starting a command
// costs the agent in each cgroup layout: it moves itself to the root
// cgroup (where the agent runs), then starts /bin/true with
// CLONE_INTO_CGROUP in rounds, the layouts alternated within each round
// so that the host's load weighs on all alike, and prints each layout's
// median. Layouts: the command's own cgroup below smolvm-commands (the
// agent's today, with its cgroup.events read after each, as release does)
// or the shared one, or the root cgroup (no limits at all); the cpu
// controller on below the root and smolvm-commands, or off. Run as root in a guest: spawnbench [ROUNDS [PER]].
package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const root = "/sys/fs/cgroup"

var cmds = filepath.Join(root, "smolvm-commands")

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "spawnbench:", err)
		os.Exit(1)
	}
}

// setCPU turns the cpu controller on or off below the root and
// smolvm-commands (off: the lower first).
func setCPU(on bool) {
	if on {
		_ = os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+cpu"), 0)
		_ = os.WriteFile(filepath.Join(cmds, "cgroup.subtree_control"), []byte("+cpu"), 0)
		return
	}
	_ = os.WriteFile(filepath.Join(cmds, "cgroup.subtree_control"), []byte("-cpu"), 0)
	_ = os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("-cpu"), 0)
}

// How a layout checks, after each command, that the cgroup is empty (as
// the agent's release does).
const (
	noCheck  = iota
	readFile // os.ReadFile of DIR/cgroup.events
	pread    // pread of cgroup.events opened once
)

type layout struct {
	name  string
	dir   string
	cpu   bool
	check int
}

func main() {
	rounds, per := 10, 20
	if len(os.Args) > 1 {
		rounds, _ = strconv.Atoi(os.Args[1])
	}
	if len(os.Args) > 2 {
		per, _ = strconv.Atoi(os.Args[2])
	}
	must(os.WriteFile(filepath.Join(root, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0))
	own := filepath.Join(cmds, "bench-own")
	if err := os.Mkdir(own, 0o755); err != nil && !os.IsExist(err) {
		must(err)
	}
	layouts := []layout{
		{"own cgroup, cpu on, ReadFile", own, true, readFile},
		{"own cgroup, cpu on, pread", own, true, pread},
		{"own cgroup, cpu on, no check", own, true, noCheck},
		{"own cgroup, cpu off, ReadFile", own, false, readFile},
		{"own cgroup, cpu off, pread", own, false, pread},
		{"shared cgroup, cpu off", filepath.Join(cmds, "shared"), false, noCheck},
		{"root cgroup (no limits), cpu off", root, false, noCheck},
	}
	times := make([][]time.Duration, len(layouts))
	for r := range rounds {
		for i := range layouts {
			j := (i + r) % len(layouts)
			l := layouts[j]
			setCPU(l.cpu)
			fd, err := unix.Open(l.dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			must(err)
			ev := -1
			if l.check == pread {
				ev, err = unix.Open(filepath.Join(l.dir, "cgroup.events"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
				must(err)
			}
			var buf [256]byte
			for range per {
				cmd := exec.Command("/bin/true")
				cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
				start := time.Now()
				err := cmd.Run()
				switch {
				case err != nil:
				case l.check == readFile:
					_, err = os.ReadFile(filepath.Join(l.dir, "cgroup.events"))
				case l.check == pread:
					_, err = unix.Pread(ev, buf[:], 0)
				}
				if err != nil {
					break
				}
				times[j] = append(times[j], time.Since(start))
			}
			unix.Close(fd)
			if ev >= 0 {
				unix.Close(ev)
			}
		}
	}
	setCPU(true)
	_ = os.Remove(own)
	for i, l := range layouts {
		t := times[i]
		if len(t) == 0 {
			fmt.Printf("%-34s refused\n", l.name)
			continue
		}
		slices.Sort(t)
		fmt.Printf("%-34s median %6.2f ms  p10 %6.2f  p90 %6.2f  (n=%d)\n", l.name,
			ms(t[len(t)/2]), ms(t[len(t)/10]), ms(t[len(t)*9/10]), len(t))
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
