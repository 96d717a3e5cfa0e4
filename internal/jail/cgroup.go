package jail

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Controllers a jailed process is limited by.
var controllers = []string{"memory", "cpu", "pids"}

// CPUPeriod is the CFS period of the CPU limit, in microseconds: a limit
// of N CPUs is a quota of N periods.
const CPUPeriod = 100000

// Limits bound a cgroup.
type Limits struct {
	MemoryBytes int64 // memory (v2 memory.max; v1 memory.limit_in_bytes)
	CPUs        int   // CPU time of this many CPUs (cpu.max; cpu.cfs_quota_us)
	Pids        int   // processes and threads (pids.max)
}

// CgroupSupport says where per-process cgroups can be made: under the
// cgroup this process runs in, in the unified (v2) hierarchy when it
// offers the controllers, else in the v1 hierarchies of each.
type CgroupSupport struct {
	// V2 is the folder of this process's v2 cgroup, when it can hold
	// children with every controller ("" otherwise).
	V2 string
	// V1 maps a controller to the folder of this process's cgroup in
	// that controller's v1 hierarchy.
	V1 map[string]string
	// Missing names the controllers neither version offers.
	Missing []string
	// Why says why v2 is not used, if it is not.
	Why string
	// Unmounted says that a hierarchy used is mounted nowhere in this
	// process's mount namespace: it is reached through a mount of its
	// own (see detachedMount), and V2/V1 are /proc/self/fd paths.
	Unmounted bool
	// records maps each folder of V2 and V1 to the hierarchy and path
	// of the cgroup it is, in the form of /proc/self/cgroup
	// ("memory:/a/b"; ":/a/b" for v2).
	records map[string]string
}

// Version is "v2", "v1" or "" (no cgroup at all).
func (c CgroupSupport) Version() string {
	switch {
	case c.V2 != "":
		return "v2"
	case len(c.V1) > 0:
		return "v1"
	}
	return ""
}

// mount is one cgroup file system mount.
type mount struct {
	root, point string
	v2          bool
	opts        []string // super options: the v1 controllers
}

// DetectCgroups finds this process's cgroups (/proc/self/cgroup) and
// where their hierarchies are mounted (/proc/self/mountinfo). A
// hierarchy mounted nowhere in this process's mount namespace (`ip netns
// exec` mounts a fresh /sys, which hides /sys/fs/cgroup) is reached
// through a mount of its own that is attached to no namespace (see
// detachedMount): nothing is mounted where anyone could see it.
func DetectCgroups() CgroupSupport {
	mounts, err := cgroupMounts("/proc/self/mountinfo")
	if err != nil {
		return CgroupSupport{Missing: controllers, Why: err.Error()}
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return CgroupSupport{Missing: controllers, Why: err.Error()}
	}
	var errs []error
	for _, line := range strings.Split(strings.TrimSpace(string(self)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || (parts[1] != "" && !slices.ContainsFunc(strings.Split(parts[1], ","), func(n string) bool { return slices.Contains(controllers, n) })) {
			continue // not a hierarchy of a controller of ours
		}
		if slices.ContainsFunc(mounts, func(m mount) bool { return m.of(parts[1]) }) {
			continue
		}
		point, err := detachedMount(parts[1])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		mounts = append(mounts, mount{root: "/", point: point, v2: parts[1] == "", opts: strings.Split(parts[1], ",")})
	}
	s := detect(mounts, string(self), os.ReadFile, enableControllers)
	if err := errors.Join(errs...); err != nil && s.Version() == "" {
		s.Why = strings.TrimPrefix(s.Why+"; "+err.Error(), "; ")
	}
	return s
}

// OwnCgroups returns the folders of this process's cgroups that its
// mount namespace shows, keyed by hierarchy as /proc/self/cgroup names
// it (v1 controllers such as "cpu,cpuacct", "" for v2), with each one's
// path in its hierarchy.
func OwnCgroups() (map[string]CgroupDir, error) {
	mounts, err := cgroupMounts("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	out := map[string]CgroupDir{}
	for _, line := range strings.Split(strings.TrimSpace(string(self)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if dir, ok := locate(mounts, parts[1], parts[2]); ok {
			out[parts[1]] = CgroupDir{Dir: dir, Path: parts[2]}
		}
	}
	return out, nil
}

// CgroupDir is a cgroup: its folder here and its path in its hierarchy.
type CgroupDir struct{ Dir, Path string }

// of reports whether m is a mount of the hierarchy that /proc/self/cgroup
// names names (its v1 controllers, "" for v2).
func (m mount) of(names string) bool {
	if m.v2 != (names == "") {
		return false
	}
	return m.v2 || slices.ContainsFunc(strings.Split(names, ","), func(n string) bool { return slices.Contains(m.opts, n) })
}

// locate finds the folder of cgroup path of hierarchy names in mounts.
func locate(mounts []mount, names, path string) (string, bool) {
	for _, m := range mounts {
		if !m.of(names) {
			continue
		}
		if rel, ok := strings.CutPrefix(path, m.root); ok {
			return filepath.Join(m.point, rel), true
		}
	}
	return "", false // outside what any mount shows
}

// detached holds the mounts of cgroup hierarchies that this process made
// itself, by hierarchy: kept open for its lifetime (a few descriptors).
var detached struct {
	sync.Mutex
	fds map[string]int
}

// detachedMount mounts the hierarchy that /proc/self/cgroup names names
// (v1 controllers, "" for v2) where no mount namespace holds it: the new
// mount API's fsmount returns it as a descriptor, attached to no folder,
// so it can neither leak into the host's namespace nor be seen by any
// other process. It returns the path that reaches the hierarchy's root
// through that descriptor (/proc/self/fd/N). The mount shows the root of
// this process's cgroup namespace, the root /proc/self/cgroup's paths
// are relative to. A v1 hierarchy is mounted with exactly the
// controllers it has, which the kernel requires to give back the
// existing hierarchy.
func detachedMount(names string) (string, error) {
	detached.Lock()
	defer detached.Unlock()
	if fd, ok := detached.fds[names]; ok {
		return "/proc/self/fd/" + strconv.Itoa(fd), nil
	}
	fstype := "cgroup"
	if names == "" {
		fstype = "cgroup2"
	}
	fs, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return "", fmt.Errorf("mount the %s hierarchy %q: %w", fstype, names, err)
	}
	defer unix.Close(fs)
	if names != "" {
		for _, n := range strings.Split(names, ",") {
			if k, v, ok := strings.Cut(n, "="); ok {
				err = unix.FsconfigSetString(fs, k, v)
			} else {
				err = unix.FsconfigSetFlag(fs, n)
			}
			if err != nil {
				return "", fmt.Errorf("mount the cgroup hierarchy %q: option %s: %w", names, n, err)
			}
		}
	}
	if err := unix.FsconfigCreate(fs); err != nil {
		return "", fmt.Errorf("mount the %s hierarchy %q: %w", fstype, names, err)
	}
	fd, err := unix.Fsmount(fs, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV|unix.MOUNT_ATTR_NOEXEC)
	if err != nil {
		return "", fmt.Errorf("mount the %s hierarchy %q: %w", fstype, names, err)
	}
	if detached.fds == nil {
		detached.fds = map[string]int{}
	}
	detached.fds[names] = fd
	return "/proc/self/fd/" + strconv.Itoa(fd), nil
}

func enableControllers(dir string) error {
	var req []string
	for _, c := range controllers {
		req = append(req, "+"+c)
	}
	return os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(req, " ")), 0)
}

func detect(mounts []mount, self string, read func(string) ([]byte, error), enable func(string) error) CgroupSupport {
	var s CgroupSupport
	s.V1 = map[string]string{}
	s.records = map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(self), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		names, path := parts[1], parts[2]
		dir, ok := locate(mounts, names, path)
		if !ok {
			continue
		}
		s.records[dir] = names + ":" + path
		if strings.HasPrefix(dir, "/proc/self/fd/") {
			s.Unmounted = true
		}
		if names == "" {
			s.V2 = dir
			continue
		}
		for _, c := range controllers {
			if slices.Contains(strings.Split(names, ","), c) {
				s.V1[c] = dir
			}
		}
	}
	if s.V2 != "" {
		have, _ := read(filepath.Join(s.V2, "cgroup.controllers"))
		sub, _ := read(filepath.Join(s.V2, "cgroup.subtree_control"))
		avail, on := strings.Fields(string(have)), strings.Fields(string(sub))
		switch {
		case !containsAll(avail, controllers):
			s.Why = fmt.Sprintf("the unified (v2) hierarchy offers controllers %q here, not all of %q", avail, controllers)
			s.V2 = ""
		case !containsAll(on, controllers):
			if err := enable(s.V2); err != nil {
				s.Why = fmt.Sprintf("cannot enable controllers for children of %s: %v", s.V2, err)
				s.V2 = ""
			}
		}
	}
	if s.V2 != "" {
		s.V1 = nil
		return s
	}
	for _, c := range controllers {
		if _, ok := s.V1[c]; !ok {
			s.Missing = append(s.Missing, c)
		}
	}
	if len(s.V1) == 0 {
		s.V1 = nil
	}
	return s
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// cgroupMounts parses a mountinfo file for cgroup and cgroup2 mounts.
func cgroupMounts(path string) ([]mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root point opts [optional...] - type source super
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		a, b := strings.Fields(pre), strings.Fields(post)
		if len(a) < 5 || len(b) < 3 || (b[0] != "cgroup" && b[0] != "cgroup2") {
			continue
		}
		ms = append(ms, mount{root: a[3], point: a[4], v2: b[0] == "cgroup2", opts: strings.Split(b[2], ",")})
	}
	return ms, sc.Err()
}

// Cgroup is one process's cgroup: a folder per v1 hierarchy, or one in
// the unified hierarchy.
type Cgroup struct {
	// Dirs are its folders (one for v2).
	Dirs []string
	// records name each of Dirs as hierarchy and path (see Record).
	records []string
	v2      bool
	fd      int // v2: an open handle for CLONE_INTO_CGROUP
}

// CreateCgroup makes the cgroup name under this process's cgroups with
// limits l. A leftover empty cgroup of that name is replaced.
func (c CgroupSupport) CreateCgroup(name string, l Limits) (_ *Cgroup, err error) {
	if name == "" || strings.ContainsAny(name, "/.") {
		return nil, fmt.Errorf("cgroup name %q: must be one plain path element", name)
	}
	cg := &Cgroup{fd: -1}
	defer func() {
		if err != nil {
			_ = cg.Remove()
		}
	}()
	files := map[string]string{}
	if c.V2 != "" {
		cg.v2 = true
		dir := filepath.Join(c.V2, name)
		if err := mkCgroup(dir); err != nil {
			return nil, err
		}
		cg.Dirs = []string{dir}
		cg.records = []string{childRecord(c.records[c.V2], name)}
		files[filepath.Join(dir, "memory.max")] = strconv.FormatInt(l.MemoryBytes, 10)
		files[filepath.Join(dir, "memory.swap.max")] = "0"
		files[filepath.Join(dir, "cpu.max")] = fmt.Sprintf("%d %d", l.CPUs*CPUPeriod, CPUPeriod)
		files[filepath.Join(dir, "pids.max")] = strconv.Itoa(l.Pids)
	} else {
		for _, ctl := range controllers {
			parent, ok := c.V1[ctl]
			if !ok {
				continue
			}
			dir := filepath.Join(parent, name)
			if slices.Contains(cg.Dirs, dir) { // co-mounted controllers
				continue
			}
			if err := mkCgroup(dir); err != nil {
				return nil, err
			}
			cg.Dirs = append(cg.Dirs, dir)
			cg.records = append(cg.records, childRecord(c.records[parent], name))
			switch ctl {
			case "memory":
				files[filepath.Join(dir, "memory.limit_in_bytes")] = strconv.FormatInt(l.MemoryBytes, 10)
			case "cpu":
				files[filepath.Join(dir, "cpu.cfs_period_us")] = strconv.Itoa(CPUPeriod)
				files[filepath.Join(dir, "cpu.cfs_quota_us")] = strconv.Itoa(l.CPUs * CPUPeriod)
			case "pids":
				files[filepath.Join(dir, "pids.max")] = strconv.Itoa(l.Pids)
			}
		}
	}
	if len(cg.Dirs) == 0 {
		return nil, errors.New("no cgroup hierarchy to make a cgroup in")
	}
	// The period before the quota (v1 checks the quota against it).
	keys := make([]string, 0, len(files))
	for k := range files {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		err := os.WriteFile(k, []byte(files[k]), 0)
		if err != nil && !(errors.Is(err, os.ErrNotExist) && strings.HasSuffix(k, "memory.swap.max")) {
			return nil, fmt.Errorf("set cgroup limit: %w", err)
		}
	}
	if cg.v2 {
		if cg.fd, err = unix.Open(cg.Dirs[0], unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
	}
	return cg, nil
}

// childRecord is the record (see CgroupFile) of cgroup name under the
// cgroup of record rec.
func childRecord(rec, name string) string {
	names, p, _ := strings.Cut(rec, ":")
	return names + ":" + path.Join(p, name)
}

func mkCgroup(dir string) error {
	err := os.Mkdir(dir, 0o755)
	if errors.Is(err, os.ErrExist) {
		// A leftover of a process that is gone: rmdir fails while
		// anything runs in it.
		if err = syscall.Rmdir(dir); err == nil {
			err = os.Mkdir(dir, 0o755)
		}
	}
	if err != nil {
		return fmt.Errorf("make cgroup: %w", err)
	}
	return nil
}

// enterThread makes the process that the calling (locked) thread starts
// begin in the cgroup: v2 clones it straight into it; v1 has no such
// call, so the thread itself moves into every hierarchy and the child
// inherits that.
func (cg *Cgroup) enterThread(attr *syscall.SysProcAttr) error {
	if cg.v2 {
		attr.UseCgroupFD, attr.CgroupFD = true, cg.fd
		return nil
	}
	tid := []byte(strconv.Itoa(unix.Gettid()))
	for _, d := range cg.Dirs {
		if err := os.WriteFile(filepath.Join(d, "tasks"), tid, 0); err != nil {
			return fmt.Errorf("enter cgroup %s: %w", d, err)
		}
	}
	return nil
}

// leaveThread moves the calling thread back to its process's cgroups
// (v1; in v2 it never entered).
func (cg *Cgroup) leaveThread() {
	if cg.v2 {
		return
	}
	tid := []byte(strconv.Itoa(unix.Gettid()))
	for _, d := range cg.Dirs {
		_ = os.WriteFile(filepath.Join(filepath.Dir(d), "tasks"), tid, 0)
	}
}

// Remove deletes the cgroup once the processes in it are gone (it waits
// up to a second for the kernel to let go of them).
func (cg *Cgroup) Remove() error {
	if cg.fd >= 0 {
		_ = unix.Close(cg.fd)
		cg.fd = -1
	}
	return RemoveCgroups(cg.Dirs)
}

// RemoveCgroups deletes cgroup folders (a missing one is not an error).
func RemoveCgroups(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		var err error
		for i := 0; i < 100; i++ {
			if err = syscall.Rmdir(d); err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			if !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// CgroupFile, in the folder of a jailed process, names its cgroup, one
// hierarchy a line, so that it can be removed after a crash of the
// process that made it, by a process in another mount namespace too: a
// line is a hierarchy and a path in it, as /proc/self/cgroup has them
// ("cpu,cpuacct:/a/smolvm-x"; ":/a/smolvm-x" for v2), which the
// remover finds where its own namespace mounts the hierarchy (or
// through a mount of its own, see detachedMount). (Older records list
// absolute folders.)
const CgroupFile = "cgroup"

// Record writes the cgroup's hierarchies and paths to dir/CgroupFile.
func (cg *Cgroup) Record(dir string) error {
	return os.WriteFile(filepath.Join(dir, CgroupFile), []byte(strings.Join(cg.records, "\n")+"\n"), 0o600)
}

// recordedDir is the folder in this mount namespace of a line of a
// CgroupFile, if it names a cgroup of this package in a hierarchy that
// this process is in too (self is its /proc/self/cgroup): only such a
// hierarchy is mounted when this namespace shows none.
func recordedDir(line string, mounts []mount, self string) (string, error) {
	if filepath.IsAbs(line) {
		return line, nil
	}
	names, p, ok := strings.Cut(line, ":")
	if !ok || !strings.HasPrefix(p, "/") || path.Clean(p) != p {
		return "", nil
	}
	if dir, ok := locate(mounts, names, p); ok {
		return dir, nil
	}
	if !slices.ContainsFunc(strings.Split(self, "\n"), func(l string) bool {
		parts := strings.SplitN(l, ":", 3)
		return len(parts) == 3 && parts[1] == names
	}) {
		return "", fmt.Errorf("no cgroup hierarchy %q here", names)
	}
	root, err := detachedMount(names)
	if err != nil {
		return "", err
	}
	return filepath.Join(root, p), nil
}

// RemoveRecordedCgroup removes the cgroup recorded in dir, if any (its
// process must be gone), and the record.
func RemoveRecordedCgroup(dir string) error {
	b, err := readOwnRecord(filepath.Join(dir, CgroupFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	mounts, err := cgroupMounts("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	var dirs []string
	for _, l := range strings.Split(string(b), "\n") {
		// Only cgroups of this package (readOwnRecord made sure the
		// file is ours; check anyway before removing anything).
		if !strings.HasPrefix(filepath.Base(l), "smolvm-") {
			continue
		}
		d, err := recordedDir(l, mounts, string(self))
		if err != nil {
			return fmt.Errorf("remove cgroup %s: %w", l, err)
		}
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	if err := RemoveCgroups(dirs); err != nil {
		return err
	}
	return os.Remove(filepath.Join(dir, CgroupFile))
}

// readOwnRecord reads a record file that this process wrote: a regular
// file (not followed if a link) owned by its user and at most 64 KiB. The
// VM's folder is writable by the jailed QEMU's group, so a file there that
// is not ours is not trusted with naming cgroups to remove.
func readOwnRecord(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok || st.Uid != uint32(os.Geteuid()) {
		return nil, fmt.Errorf("%s is not a record of this user's: not trusted", path)
	}
	return io.ReadAll(io.LimitReader(f, 64<<10))
}
