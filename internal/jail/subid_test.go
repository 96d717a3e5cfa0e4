package jail

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

func TestFreeRange(t *testing.T) {
	for _, c := range []struct {
		taken []IDRange
		want  uint32
	}{
		{nil, 100000},
		{[]IDRange{{100000, 65536}}, 165536},
		{[]IDRange{{100000, 1}, {165537, 1}}, 231072},         // one id of each of the first two blocks
		{[]IDRange{{100000, 65536}, {100000, 65536}}, 165536}, // subuid and subgid alike
		{[]IDRange{{0, 1 << 31}}, 1<<31 + 34464},              // the first step past 2^31
	} {
		if got, ok := freeRange(c.taken); !ok || got != c.want {
			t.Errorf("freeRange(%v) = %d, %v; want %d", c.taken, got, ok, c.want)
		}
	}
	if got, ok := freeRange([]IDRange{{0, 1<<32 - 1}}); ok {
		t.Errorf("freeRange of all ids = %d", got)
	}
}

// SubIDs takes the owner's range when the files give one (by number or
// name), else User's, else none; lines it cannot read are skipped.
func TestSubIDs(t *testing.T) {
	write := fakeSubIDFiles(t)
	write("# comment\nbad line\n4321:x:5\n4321:300000:65536\n4321:400000:10\n", "4321:500000:1000\n")
	u, g, ok := SubIDs(4321)
	if !ok || u != (IDRange{300000, 65536}) || g != (IDRange{500000, 1000}) {
		t.Errorf("SubIDs(4321) = %v %v %v; want the first ranges of 4321", u, g, ok)
	}
	if _, _, ok := SubIDs(4322); ok {
		t.Error("SubIDs of a user without ranges found some")
	}
	write("4321:300000:65536\n", "") // no gids: not usable
	if _, _, ok := SubIDs(4321); ok {
		t.Error("SubIDs found uids without gids")
	}
	write("root:300000:65536\n"+User+":600000:65536\n", "root:300000:65536\n"+User+":700000:65536\n")
	if u, g, ok := SubIDs(0); !ok || u.Start != 300000 || g.Start != 300000 {
		t.Errorf("SubIDs(0) = %v %v %v; want root's by name", u, g, ok)
	}
	if u, g, ok := SubIDs(4321); !ok && Detect().UserErr == nil || ok && (u.Start != 600000 || g.Start != 700000) {
		t.Errorf("SubIDs(4321) = %v %v %v; want %s's", u, g, ok, User)
	}
	if r := (IDRange{10, 5}); !r.Holds(10) || !r.Holds(14) || r.Holds(15) || r.Holds(9) {
		t.Errorf("Holds of %v", r)
	}
}

// In a user namespace with subordinate ids, a user other than its root
// makes files in a writable bind, owned on the host by the range's
// start+N-1; root's files belong to the mapped owner.
func TestIDMapSubIDs(t *testing.T) {
	needRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("no setpriv")
	}
	shared := t.TempDir()
	if err := os.Chmod(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	const owner, start = 4321, 300000
	j := &Jail{Root: t.TempDir(), Binds: []Bind{{Source: shared, Target: "/mnt"}},
		UserNS: &IDMap{UID: owner, GID: owner, SubUIDs: IDRange{start, 65536}, SubGIDs: IDRange{start, 65536}}}
	out, err := runJailed(t, j, "/bin/sh", "-c", "touch /mnt/root && setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'echo x > /mnt/user; mv /mnt/user /mnt/user2; id -u' && stat -c %u:%g /mnt/user2")
	if err != nil || out != "1000\n1000:1000\n" {
		t.Fatalf("jailed shell: %v: %q", err, out)
	}
	for name, want := range map[string]uint32{"root": owner, "user2": start + 999} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(shared, name), &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != want || st.Gid != want {
			t.Errorf("%s belongs to %d:%d on the host; want %d:%d", name, st.Uid, st.Gid, want, want)
		}
	}
}

// fakeSubIDFiles points subUIDFile and subGIDFile at files of a test
// folder for the test's length; the function it returns writes them.
func fakeSubIDFiles(t *testing.T) func(u, g string) {
	dir := t.TempDir()
	oldU, oldG := subUIDFile, subGIDFile
	subUIDFile, subGIDFile = filepath.Join(dir, "subuid"), filepath.Join(dir, "subgid")
	t.Cleanup(func() { subUIDFile, subGIDFile = oldU, oldG })
	return func(u, g string) {
		t.Helper()
		if err := os.WriteFile(subUIDFile, []byte(u), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(subGIDFile, []byte(g), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
