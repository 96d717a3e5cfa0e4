package supervisor

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// TestRemoveAbandonedSpares: a spare folder is removed when its owner
// process is gone or unknown, and kept while its owner runs.
func TestRemoveAbandonedSpares(t *testing.T) {
	dir := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	owners := map[string]string{
		"live":    strconv.Itoa(os.Getpid()),
		"dead":    strconv.Itoa(dead.Process.Pid),
		"garbage": "not a pid",
		"none":    "",
	}
	for name, owner := range owners {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(p, SpareOwnerFile), []byte(owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	removed := RemoveAbandonedSpares(dir)
	slices.Sort(removed)
	if want := []string{"dead", "garbage", "none"}; !slices.Equal(removed, want) {
		t.Errorf("removed %v, want %v", removed, want)
	}
	if _, err := os.Stat(filepath.Join(dir, "live")); err != nil {
		t.Errorf("the live owner's spare: %v", err)
	}
	if got := RemoveAbandonedSpares(filepath.Join(dir, "missing")); len(got) != 0 {
		t.Errorf("a missing folder: removed %v", got)
	}
}
