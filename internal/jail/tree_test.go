package jail

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// runJailed runs argv in j and returns its output and how it ended.
func runJailed(t *testing.T, j *Jail, argv ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = "/"
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	release, err := j.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	release()
	return out.String(), err
}

// A folder opened with OpenTree is what its Bind mounts, though it is
// swapped for a link to a folder outside before the jail is built; a
// folder already swapped, or outside the folder it must lie beneath, is
// refused.
func TestOpenTreeSwapped(t *testing.T) {
	needRoot(t)
	allowed, outside := t.TempDir(), t.TempDir()
	dir := filepath.Join(allowed, "dir")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for d, s := range map[string]string{dir: "inside", outside: "outside"} {
		if err := os.WriteFile(filepath.Join(d, "in"), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tree, st, err := OpenTree(allowed, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer tree.Close()
	var want syscall.Stat_t
	if err := syscall.Stat(dir, &want); err != nil {
		t.Fatal(err)
	}
	if st.Ino != want.Ino {
		t.Errorf("OpenTree's status: inode %d, want %d", st.Ino, want.Ino)
	}
	// The swap, after the check and before the bind.
	if err := os.Rename(dir, dir+".old"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, dir); err != nil {
		t.Fatal(err)
	}
	j := &Jail{Root: t.TempDir(), Binds: []Bind{{Source: dir, Target: "/mnt", ReadOnly: true, Tree: tree}}}
	if out, err := runJailed(t, j, "/bin/cat", "/mnt/in"); err != nil || out != "inside" {
		t.Errorf("the jail sees %q (%v) in the bound folder; want the folder opened, %q", out, err, "inside")
	}

	if _, _, err := OpenTree(allowed, dir); !errors.Is(err, ErrLinkOnPath) {
		t.Errorf("OpenTree of a folder swapped for a link: %v; want ErrLinkOnPath", err)
	}
	if err := os.Symlink(allowed, filepath.Join(outside, "up")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{outside, filepath.Join(allowed, "..", filepath.Base(outside)), filepath.Join(outside, "up", "dir.old")} {
		if tr, _, err := OpenTree(allowed, p); err == nil {
			tr.Close()
			t.Errorf("OpenTree(%s, %s) opened it", allowed, p)
		}
	}
	// A link above the folder it must lie beneath is refused too.
	if _, _, err := OpenTree(filepath.Join(outside, "up"), filepath.Join(outside, "up", "dir.old")); !errors.Is(err, ErrLinkOnPath) {
		t.Errorf("OpenTree beneath a link: %v; want ErrLinkOnPath", err)
	}
}
