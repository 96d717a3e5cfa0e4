package jail

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: jails drop to another user and make mount namespaces")
	}
}

// A jailed process runs as the given user, sees only the system folders,
// the bound paths and the base devices, and starts in the cgroup with its
// limits; nothing of the jail is left on the host.
func TestJailedProcess(t *testing.T) {
	needRoot(t)
	root := t.TempDir()
	shared := t.TempDir()
	if err := os.WriteFile(filepath.Join(shared, "in"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	cs := DetectCgroups()
	if cs.Version() == "" {
		t.Skip("no cgroup hierarchy: " + cs.Why)
	}
	name := "smolvm-test-" + strconv.Itoa(os.Getpid())
	cg, err := cs.CreateCgroup(name, Limits{MemoryBytes: 256 << 20, CPUs: 1, Pids: 32})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })

	j := &Jail{UID: 65534, GID: 65534, Root: root, ReadOnly: []string{shared}, Cgroup: cg}
	script := `id -u; id -g; cat ` + shared + `/in; echo; ls -a /; ls /dev; cat /proc/self/cgroup 2>&1 | head -1; ` +
		`cat ` + secret + ` 2>&1 | head -1; touch ` + shared + `/w 2>&1 | head -1; echo $$`
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	release, err := j.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	// Read the process's cgroup from the host while it runs.
	procs := map[string]string{}
	for _, d := range cg.Dirs {
		b, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		procs[d] = string(b)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("jailed shell: %v\n%s", err, out.String())
	}
	release()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	t.Logf("jailed shell said:\n%s", out.String())
	if lines[0] != "65534" || lines[1] != "65534" {
		t.Errorf("uid/gid %s/%s, want 65534/65534", lines[0], lines[1])
	}
	if lines[2] != "hello" {
		t.Errorf("bound file read %q, want hello", lines[2])
	}
	rootList := strings.Fields(strings.Join(lines[3:], " "))
	for _, want := range []string{"usr", "lib", "dev", "null", "urandom"} {
		if !slices.Contains(rootList, want) {
			t.Errorf("jail lacks %s: %q", want, rootList)
		}
	}
	for _, unwanted := range []string{"home", "root", "proc", "sys", "var"} {
		if slices.Contains(rootList, unwanted) && !strings.HasPrefix(shared, "/"+unwanted) {
			t.Errorf("jail shows /%s: %q", unwanted, rootList)
		}
	}
	if !strings.Contains(out.String(), "No such file") {
		t.Errorf("a file outside the jail was readable:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "Read-only file system") {
		t.Errorf("a read-only bind was writable:\n%s", out.String())
	}
	if pid1 := lines[len(lines)-1]; pid1 != "1" {
		t.Errorf("the jailed process is pid %s in its namespace, want 1 (a pid namespace of its own)", pid1)
	}
	for d, p := range procs {
		if !strings.Contains(p, strconv.Itoa(cmd.Process.Pid)) {
			t.Errorf("cgroup %s holds %q, not the jailed pid %d", d, p, cmd.Process.Pid)
		}
	}
	if err := cg.Remove(); err != nil {
		for _, d := range cg.Dirs {
			b, _ := os.ReadFile(filepath.Join(d, "tasks"))
			t.Logf("%s tasks: %q (test pid %d)", d, b, os.Getpid())
		}
		t.Fatal(err)
	}
	for _, d := range cg.Dirs {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left behind: %v", d, err)
		}
	}
	// The jail's mounts were in the process's namespace only.
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Errorf("the jail root on the host is not empty: %v", ents)
	}
}

func TestDetectCgroups(t *testing.T) {
	v1 := []mount{
		{root: "/", point: "/sys/fs/cgroup/cpu", opts: []string{"rw", "cpu"}},
		{root: "/", point: "/sys/fs/cgroup/memory", opts: []string{"rw", "memory"}},
		{root: "/", point: "/sys/fs/cgroup/pids", opts: []string{"rw", "pids"}},
		{root: "/", point: "/sys/fs/cgroup/unified", v2: true},
	}
	self := "8:pids:/\n4:memory:/box/1\n1:cpu:/\n0::/\n"
	files := map[string]string{"/sys/fs/cgroup/unified/cgroup.controllers": ""}
	read := func(p string) ([]byte, error) { return []byte(files[p]), nil }
	noEnable := func(string) error { return errors.New("busy") }
	got := detect(v1, self, read, noEnable)
	if got.Version() != "v1" || got.V1["memory"] != "/sys/fs/cgroup/memory/box/1" || got.V1["cpu"] != "/sys/fs/cgroup/cpu" || len(got.Missing) != 0 {
		t.Errorf("v1 host: %+v", got)
	}
	if !strings.Contains(got.Why, "offers controllers") {
		t.Errorf("v1 host: no reason for not using v2: %q", got.Why)
	}

	v2 := []mount{{root: "/", point: "/sys/fs/cgroup", v2: true}}
	files = map[string]string{
		"/sys/fs/cgroup/app/cgroup.controllers":     "cpuset cpu io memory pids",
		"/sys/fs/cgroup/app/cgroup.subtree_control": "",
	}
	got = detect(v2, "0::/app\n", read, func(string) error { return nil })
	if got.Version() != "v2" || got.V2 != "/sys/fs/cgroup/app" {
		t.Errorf("v2 host: %+v", got)
	}
	got = detect(v2, "0::/app\n", read, noEnable)
	if got.Version() != "" || !strings.Contains(got.Why, "busy") || len(got.Missing) != 3 {
		t.Errorf("v2 host that cannot delegate: %+v", got)
	}
}

// childEnv, set, makes the test binary the child of TestDetachedCgroup:
// it makes and records a cgroup in the folder the variable names.
const childEnv = "SMOLVM_JAIL_TEST_CGROUP_CHILD"

// A process whose mount namespace shows no cgroup hierarchy (as under
// `ip netns exec`) still makes its cgroups under its own, through mounts
// that no namespace holds; its record lets a process of the host's
// namespace find and remove them; and the host's mounts are unchanged.
func TestDetachedCgroup(t *testing.T) {
	if dir := os.Getenv(childEnv); dir != "" {
		cs := DetectCgroups()
		cg, err := cs.CreateCgroup("smolvm-test-detached", Limits{MemoryBytes: 64 << 20, CPUs: 1, Pids: 7})
		if err == nil {
			err = cg.Record(dir)
		}
		if err != nil {
			t.Fatalf("%v (%+v)", err, cs)
		}
		t.Logf("dirs %q", cg.Dirs)
		return
	}
	needRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("needs unshare (util-linux)")
	}
	host := DetectCgroups()
	if host.Version() == "" {
		t.Skip("no cgroup hierarchy: " + host.Why)
	}
	mounts := func() string {
		b, _ := os.ReadFile("/proc/self/mountinfo")
		var out []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, " - cgroup") {
				out = append(out, l)
			}
		}
		return strings.Join(out, "\n")
	}
	before := mounts()
	dir := t.TempDir()
	// The child's namespace: private, with every cgroup mount gone.
	script := `grep ' - cgroup' /proc/self/mountinfo | cut -d' ' -f5 | sort -r | xargs -r umount -l && ` +
		`! grep -q ' - cgroup' /proc/self/mountinfo && exec "$0" -test.run '^TestDetachedCgroup$' -test.v`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"="+dir)
	out, err := cmd.CombinedOutput()
	t.Logf("child:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	var made []string
	for _, ctl := range controllers {
		parent := host.V2
		if parent == "" {
			parent = host.V1[ctl]
		}
		if parent == "" {
			continue
		}
		d := filepath.Join(parent, "smolvm-test-detached")
		made = append(made, d)
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s cgroup not made under this process's: %v", ctl, err)
		}
		if ctl == "pids" {
			if b, err := os.ReadFile(filepath.Join(d, "pids.max")); err != nil || strings.TrimSpace(string(b)) != "7" {
				t.Errorf("pids.max %q (%v), want 7", b, err)
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, CgroupFile)); err != nil || strings.Contains(string(b), "/proc/") {
		t.Errorf("record %q (%v): want hierarchies and paths", b, err)
	}
	if err := RemoveRecordedCgroup(dir); err != nil {
		t.Fatal(err)
	}
	for _, d := range made {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after RemoveRecordedCgroup (%v)", d, err)
		}
	}
	if after := mounts(); after != before {
		t.Errorf("the host's cgroup mounts changed:\n%s\nnow:\n%s", before, after)
	}
}

func TestRecordedDir(t *testing.T) {
	mounts := []mount{{root: "/", point: "/sys/fs/cgroup/cpu,cpuacct", opts: []string{"rw", "cpu", "cpuacct"}}}
	self := "1:cpu,cpuacct:/a\n0::/\n"
	for line, want := range map[string]string{
		"cpu,cpuacct:/a/smolvm-x":    "/sys/fs/cgroup/cpu,cpuacct/a/smolvm-x",
		"/sys/fs/cgroup/x/smolvm-y":  "/sys/fs/cgroup/x/smolvm-y", // an older record
		"cpu,cpuacct:/a/../smolvm-x": "",
		"cpu,cpuacct:a/smolvm-x":     "",
		"smolvm-x":                   "",
	} {
		if got, err := recordedDir(line, mounts, self); got != want || err != nil {
			t.Errorf("recordedDir(%q) = %q, %v; want %q", line, got, err, want)
		}
	}
	// A hierarchy this process is not in is not mounted to find it.
	if got, err := recordedDir("name=other:/smolvm-x", mounts, self); err == nil {
		t.Errorf("a record of a hierarchy this process is not in: %q", got)
	}
}
