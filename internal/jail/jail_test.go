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
