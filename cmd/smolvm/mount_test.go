package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/testutil"
)

// --mount: a bad one exits 3 before boot, naming the cause; a good one
// shares the folder (read-only unless :rw).
func TestMountFlag(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("host folders need smolvm to run as root")
	}
	home := testutil.Home(t)
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"create", "--mount", filepath.Join(dir, "missing") + ":/m"}, "does not exist"},
		{[]string{"create", "--mount", dir + ":/etc"}, "system folder"},
		{[]string{"create", "--mount", dir + ":/m", "--mount", dir + ":/m:rw"}, "two host folders"},
		{[]string{"run", "--mount", dir, "--", "true"}, "HOST_DIR:GUEST_DIR"},
	} {
		r := smolvmRun(t, home, "", c.args...)
		if r.code != 3 || !strings.Contains(r.stderr, c.want) || r.stdout != "" {
			t.Errorf("smolvm %s: exit %d, stdout %q, stderr %q; want exit 3 naming %q", strings.Join(c.args, " "), r.code, r.stdout, r.stderr, c.want)
		}
	}
	if vms := listVMs(t, home); len(vms) != 0 {
		t.Errorf("refused commands left VMs: %+v", vms)
	}
	if err := os.WriteFile(filepath.Join(dir, "in"), []byte("host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := smolvmRun(t, home, "", "run", "--mount", dir+":/ro", "--mount", dir+":/rw:rw", "--",
		"sh", "-c", "cat /ro/in; echo no > /ro/out || echo refused; echo guest > /rw/out")
	if r.code != 0 || r.stdout != "host\nrefused\n" {
		t.Errorf("run with mounts: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "out")); err != nil || string(b) != "guest\n" {
		t.Errorf("the guest's file on the host: %q, %v", b, err)
	}
}
