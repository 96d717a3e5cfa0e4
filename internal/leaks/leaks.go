// Package leaks takes stock of what smolvm holds on the host for one state
// folder: its QEMU and supervisor processes, this process's open files,
// unix sockets, files under the folder, store rows, TAP devices, nftables
// rules and cgroups. Comparing a stock taken before some work with one
// taken after names what the work left behind; the soak (`smolvm bench
// --soak`) and the chaos tests do that.
package leaks

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// The kinds of things a stock holds, in the order reports list them.
const (
	KindProcesses = "processes" // QEMU and supervisor processes of the home
	KindFDs       = "fds"       // open file descriptors of this process
	KindSockets   = "sockets"   // unix sockets under the home (files, or bound names in /proc/net/unix)
	KindFiles     = "files"     // files and folders under the home, but the cache and the database
	KindVMs       = "vms"       // VM rows in the store
	KindLeases    = "leases"    // lease rows in the store (ports, addresses, vsock CIDs)
	KindSnapshots = "snapshots" // snapshot rows in the store
	KindTAPs      = "taps"      // network devices named like a VM's TAP, in this network namespace
	KindNFTRules  = "nftables"  // rules tagged "smolvm vm ID" in table inet smolvm, in this network namespace
	KindCgroups   = "cgroups"   // folders below the cgroups this process is in, v1 and v2
)

// Kinds lists every kind, in report order.
var Kinds = []string{KindProcesses, KindFDs, KindSockets, KindFiles, KindVMs, KindLeases, KindSnapshots, KindTAPs, KindNFTRules, KindCgroups}

// Stock is what a state folder holds on the host at one moment: for each
// kind, one line per thing. The fds kind holds one line per open file
// descriptor of this process ("fd -> target").
type Stock struct {
	Home  string
	Items map[string][]string
	// Unknown names the kinds that could not be read, with why (nftables
	// without the privilege to list rules, say).
	Unknown map[string]string
}

// Take takes stock of home.
func Take(ctx context.Context, home string) (*Stock, error) {
	home = filepath.Clean(home)
	s := &Stock{Home: home, Items: map[string][]string{}, Unknown: map[string]string{}}
	set := func(kind string, items []string, err error) {
		if err != nil {
			s.Unknown[kind] = err.Error()
			return
		}
		slices.Sort(items)
		s.Items[kind] = items
	}
	set(KindProcesses, Processes(home), nil)
	open, err := fds()
	set(KindFDs, open, err)
	files, sockets, err := walkHome(home)
	set(KindFiles, files, err)
	bound, berr := boundSockets(home)
	set(KindSockets, append(sockets, bound...), berr)
	if err := storeRows(ctx, home, set); err != nil {
		return nil, err
	}
	devs, err := taps()
	set(KindTAPs, devs, err)
	rules, err := nftRules()
	set(KindNFTRules, rules, err)
	cgs, err := cgroups()
	set(KindCgroups, cgs, err)
	return s, nil
}

// Processes lists the live QEMU and supervisor processes that belong to
// home: a QEMU whose command line names a file in it, or a supervisor
// (`smolvm __supervise`) whose environment has SMOLVM_HOME=home. Each
// entry is "PID command line".
func Processes(home string) []string {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	// QEMU's arguments name files in the home: match "home/" so that
	// /tmp/smv12 does not match a QEMU of /tmp/smv123.
	inHome := []byte(strings.TrimRight(home, "/") + "/")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 { // gone, or a zombie
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		mine := false
		switch {
		case (strings.Contains(filepath.Base(args[0]), "qemu") || filepath.Base(args[0]) == "virtiofsd") && bytes.Contains(cmdline, inHome):
			mine = true
		case bytes.Contains(cmdline, []byte("__supervise\x00")):
			env, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
			for _, kv := range bytes.Split(env, []byte{0}) {
				if string(kv) == "SMOLVM_HOME="+home {
					mine = true
				}
			}
		}
		if mine {
			out = append(out, e.Name()+" "+strings.Join(args, " "))
		}
	}
	return out
}

// fds lists this process's open file descriptors as "fd -> target".
func fds() ([]string, error) {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	own := strconv.Itoa(int(d.Fd()))
	var out []string
	for _, n := range names {
		if n == own {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + n)
		if err != nil {
			continue // closed meanwhile
		}
		out = append(out, n+" -> "+target)
	}
	return out, nil
}

// walkHome lists what is under home but the image cache and the database
// (which every process opens and grows): files and folders as paths
// relative to home (a folder with a trailing slash), unix sockets apart.
func walkHome(home string) (files, sockets []string, err error) {
	err = filepath.WalkDir(home, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil // removed meanwhile
			}
			return err
		}
		rel, _ := filepath.Rel(home, p)
		switch {
		case rel == ".":
			return nil
		case rel == "cache" || strings.HasPrefix(rel, store.DBName):
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		case d.Type()&fs.ModeSocket != 0:
			sockets = append(sockets, rel)
		case d.IsDir() && !strings.Contains(rel, "/"):
			// vms/, spares/, snapshots/…: containers that stay, made
			// by the first thing they hold.
		case d.IsDir():
			files = append(files, rel+"/")
		default:
			files = append(files, rel)
		}
		return nil
	})
	return files, sockets, err
}

// boundSockets lists the unix sockets of this network namespace bound to a
// name under home whose file is gone: a socket still served after its file
// was removed. (Sockets with their file are in walkHome's list.)
func boundSockets(home string) ([]string, error) {
	f, err := os.Open("/proc/net/unix")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	prefix := home + "/"
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || !strings.HasPrefix(fields[7], prefix) {
			continue
		}
		if _, err := os.Lstat(fields[7]); os.IsNotExist(err) {
			rel, _ := filepath.Rel(home, fields[7])
			out = append(out, rel+" (bound, file removed)")
		}
	}
	return out, sc.Err()
}

// storeRows lists the store's VM, lease and snapshot rows.
func storeRows(ctx context.Context, home string, set func(string, []string, error)) error {
	if _, err := os.Stat(filepath.Join(home, store.DBName)); err != nil {
		set(KindVMs, nil, nil)
		set(KindLeases, nil, nil)
		set(KindSnapshots, nil, nil)
		return nil // no database yet, no rows
	}
	st, err := store.Open(ctx, home)
	if err != nil {
		return err
	}
	defer st.Close()
	vms, err := st.ListVMs(ctx)
	var rows []string
	for _, v := range vms {
		rows = append(rows, fmt.Sprintf("%s %s %s", v.ID, v.Name, v.State))
	}
	set(KindVMs, rows, err)
	leases, err := st.Leases(ctx, "")
	rows = nil
	for _, l := range leases {
		rows = append(rows, fmt.Sprintf("%s %d %s", l.Pool, l.Value, l.Owner))
	}
	set(KindLeases, rows, err)
	sns, err := st.ListSnapshots(ctx)
	rows = nil
	for _, sn := range sns {
		rows = append(rows, sn.Name)
	}
	set(KindSnapshots, rows, err)
	return nil
}

// taps lists this network namespace's devices named like a VM's TAP.
func taps() ([]string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, i := range ifs {
		if strings.HasPrefix(i.Name, network.TAPPrefix) {
			out = append(out, i.Name)
		}
	}
	return out, nil
}

// nftRules lists the owners of the smolvm table's rules, one line per rule.
func nftRules() ([]string, error) {
	owners, err := network.RuleOwners()
	if err != nil {
		return nil, err
	}
	out := make([]string, len(owners))
	for i, o := range owners {
		out[i] = "smolvm vm " + o
	}
	return out, nil
}

// cgroups lists the folders below each cgroup this process is in (every v1
// hierarchy and the v2 one), as "hierarchy:path".
func cgroups() ([]string, error) {
	own, err := jail.OwnCgroups()
	if err != nil {
		return nil, err
	}
	var out []string
	for names, cg := range own {
		key := names
		if key == "" {
			key = "cgroup2"
		}
		_ = filepath.WalkDir(cg.Dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() || p == cg.Dir {
				return nil // a cgroup removed meanwhile
			}
			rel, _ := filepath.Rel(cg.Dir, p)
			out = append(out, key+":"+filepath.Join(cg.Path, rel))
			return nil
		})
	}
	return out, nil
}

// Leaks is what a stock holds that an earlier one did not, per kind.
type Leaks map[string][]string

// Count is how many things leaked in all.
func (l Leaks) Count() int {
	n := 0
	for _, items := range l {
		n += len(items)
	}
	return n
}

// Counts is how many things leaked per kind, every kind present.
func (l Leaks) Counts() map[string]int {
	out := make(map[string]int, len(Kinds))
	for _, k := range Kinds {
		out[k] = len(l[k])
	}
	return out
}

// String lists the leaks, one kind a line ("" for none).
func (l Leaks) String() string {
	var b strings.Builder
	for _, k := range Kinds {
		if items := l[k]; len(items) > 0 {
			fmt.Fprintf(&b, "%s: %s\n", k, strings.Join(items, "; "))
		}
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// Since is what s holds that before did not. Processes, sockets, files,
// store rows and fds are compared as they are; TAP devices, nftables rules
// and cgroups are host-wide, so when owned is set only those whose name
// contains one of its VM ids count (another state folder's VMs come and
// go meanwhile).
func (s *Stock) Since(before *Stock, owned func(string) bool) Leaks {
	out := Leaks{}
	for _, k := range Kinds {
		if k == KindFDs {
			if l := newFDs(before.Items[k], s.Items[k]); len(l) > 0 {
				out[k] = l
			}
			continue
		}
		old := map[string]int{}
		for _, it := range before.Items[k] {
			old[it]++
		}
		for _, it := range s.Items[k] {
			if old[it] > 0 {
				old[it]--
				continue
			}
			switch k {
			case KindTAPs, KindNFTRules, KindCgroups:
				if owned != nil && !owned(it) {
					continue
				}
			}
			out[k] = append(out[k], it)
		}
	}
	return out
}

// newFDs is the descriptors open now beyond as many as before: those whose
// number was not open before, as many as there are more now. (A file
// closed and another opened in its place is no leak.)
func newFDs(before, now []string) []string {
	extra := len(now) - len(before)
	if extra <= 0 {
		return nil
	}
	was := map[string]bool{}
	for _, f := range before {
		n, _, _ := strings.Cut(f, " ")
		was[n] = true
	}
	var out []string
	for _, f := range now {
		if n, _, _ := strings.Cut(f, " "); !was[n] && len(out) < extra {
			out = append(out, f)
		}
	}
	return out
}

// Wait takes stock of home until nothing has leaked since before, or
// timeout passes (a VM's processes take a moment to go after a delete, a
// killed supervisor's QEMU to follow it), and returns what is left.
func Wait(ctx context.Context, before *Stock, owned func(string) bool, timeout time.Duration) (Leaks, *Stock, error) {
	deadline := time.Now().Add(timeout)
	delay := 5 * time.Millisecond
	for {
		now, err := Take(ctx, before.Home)
		if err != nil {
			return nil, nil, err
		}
		l := now.Since(before, owned)
		if l.Count() == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return l, now, nil
		}
		time.Sleep(delay)
		if delay < 200*time.Millisecond {
			delay *= 2
		}
	}
}

// Owned is an owned function for Since: true for names that contain one of
// ids.
func Owned(ids []string) func(string) bool {
	return func(s string) bool {
		for _, id := range ids {
			if id != "" && strings.Contains(s, id) {
				return true
			}
		}
		return false
	}
}
