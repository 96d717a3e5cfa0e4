package leaks

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/store"
)

// TestSinceNamesWhatWasLeft leaves one thing of each kind a test can make
// without a VM and checks the stock names each, and nothing that was there
// before or is gone again.
func TestSinceNamesWhatWasLeft(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	if err := os.MkdirAll(filepath.Join(home, "cache", "kernel"), 0o700); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, home)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// There before: not a leak.
	old := &store.VM{Name: "old"}
	if err := st.CreateVM(ctx, old); err != nil {
		t.Fatal(err)
	}
	before, err := Take(ctx, home)
	if err != nil {
		t.Fatal(err)
	}

	vm := &store.VM{Name: "left"}
	if err := st.CreateVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Allocate(ctx, "host-port", vm.ID, 40000, 40010); err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteVM(ctx, old.ID); err != nil { // gone: not a leak either
		t.Fatal(err)
	}
	dir := filepath.Join(home, "vms", vm.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "console.log"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// The cache and the database change with every use: never leaks.
	if err := os.WriteFile(filepath.Join(home, "cache", "kernel", "x"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(dir, "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	gone, err := net.Listen("unix", filepath.Join(home, "gone.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer gone.Close()
	gone.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Remove(filepath.Join(home, "gone.sock")); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	now, err := Take(ctx, home)
	if err != nil {
		t.Fatal(err)
	}
	got := now.Since(before, Owned([]string{vm.ID}))
	want := map[string][]string{
		KindFiles:   {"vms/" + vm.ID + "/", "vms/" + vm.ID + "/console.log"},
		KindSockets: {"gone.sock (bound, file removed)", "vms/" + vm.ID + "/api.sock"},
		KindVMs:     {vm.ID + " left creating"},
		KindLeases:  {"host-port 40000 " + vm.ID},
	}
	for k, w := range want {
		g := slices.Clone(got[k])
		slices.Sort(g)
		if !slices.Equal(g, w) {
			t.Errorf("%s: got %q, want %q", k, g, w)
		}
	}
	// A listener and a file: at least two more descriptors, the file's
	// among them.
	if n := len(got[KindFDs]); n < 2 || !slices.ContainsFunc(got[KindFDs], func(s string) bool { return s == fdLine(t, f) }) {
		t.Errorf("fds: got %q, want the listener's and %s", got[KindFDs], fdLine(t, f))
	}
	for _, k := range []string{KindProcesses, KindSnapshots, KindTAPs, KindNFTRules, KindCgroups} {
		if len(got[k]) > 0 {
			t.Errorf("%s: got %q, want nothing", k, got[k])
		}
	}

	// Taken away again: nothing is left.
	l.Close()
	gone.Close()
	f.Close()
	if err := os.RemoveAll(filepath.Join(home, "vms")); err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteVM(ctx, vm.ID); err != nil {
		t.Fatal(err)
	}
	st.Close() // its pool of connections grew meanwhile
	after, err := Take(ctx, home)
	if err != nil {
		t.Fatal(err)
	}
	if l := after.Since(before, Owned([]string{vm.ID})); l.Count() > 0 {
		t.Errorf("left after removing everything:\n%s", l)
	}
}

func fdLine(t *testing.T, f *os.File) string {
	t.Helper()
	n := strconv.Itoa(int(f.Fd()))
	target, err := os.Readlink("/proc/self/fd/" + n)
	if err != nil {
		t.Fatal(err)
	}
	return n + " -> " + target
}

// TestOwnedFiltersHostWideKinds checks that TAPs, nftables rules and
// cgroups of other VMs (another state folder's) are not counted.
func TestOwnedFiltersHostWideKinds(t *testing.T) {
	before := &Stock{Items: map[string][]string{}}
	now := &Stock{Items: map[string][]string{
		KindTAPs:     {"smvaaaaaaaaaaaa", "smvbbbbbbbbbbbb"},
		KindNFTRules: {"smolvm vm bbbbbbbbbbbb"},
		KindCgroups:  {"cpu:/smolvm-aaaaaaaaaaaa", "cpu:/other"},
	}}
	got := now.Since(before, Owned([]string{"aaaaaaaaaaaa"}))
	if got.Count() != 2 || len(got[KindTAPs]) != 1 || len(got[KindCgroups]) != 1 {
		t.Errorf("got %v, want the TAP and the cgroup of aaaaaaaaaaaa alone", got)
	}
	if all := now.Since(before, nil); all.Count() != 5 {
		t.Errorf("without a filter: got %v, want all 5", all)
	}
}

// cgroups finds a cgroup made below this process's own, in every
// hierarchy the mount namespace shows.
func TestCgroupsFindsANewOne(t *testing.T) {
	own, err := jail.OwnCgroups()
	if err != nil || len(own) == 0 || os.Geteuid() != 0 {
		t.Skipf("no cgroup of this process to write to (%v, euid %d)", err, os.Geteuid())
	}
	name := fmt.Sprintf("smolvm-leaks-test-%d", os.Getpid())
	var made []string
	for names, cg := range own {
		dir := filepath.Join(cg.Dir, name)
		if os.Mkdir(dir, 0o755) != nil {
			continue // not writable here (a read-only v2 root, say)
		}
		t.Cleanup(func() { _ = os.Remove(dir) })
		if names == "" {
			names = "cgroup2"
		}
		made = append(made, names+":"+filepath.Join(cg.Path, name))
	}
	if len(made) == 0 {
		t.Skip("no hierarchy lets this process make a cgroup")
	}
	got, err := cgroups()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range made {
		if !slices.Contains(got, m) {
			t.Errorf("cgroups() = %v, want %s in it", got, m)
		}
	}
}
