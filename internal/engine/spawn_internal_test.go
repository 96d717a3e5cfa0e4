package engine

import (
	"os"
	"path/filepath"
	"testing"
)

// TestSupervisorProgram: the small supervisor binary beside the smolvm
// binary (or beside the file it links to, or in ../libexec/smolvm) runs
// the supervisors; without one, or with one that cannot run, smolvm itself.
func TestSupervisorProgram(t *testing.T) {
	file := func(p string, mode os.FileMode) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	d := t.TempDir()

	alone := file(filepath.Join(d, "alone", "smolvm"), 0o755)
	noexec := file(filepath.Join(d, "noexec", "smolvm"), 0o755)
	file(filepath.Join(d, "noexec", SupervisorProgram), 0o644)
	dirNamed := file(filepath.Join(d, "dir", "smolvm"), 0o755)
	if err := os.MkdirAll(filepath.Join(d, "dir", SupervisorProgram), 0o755); err != nil {
		t.Fatal(err)
	}
	beside := file(filepath.Join(d, "beside", "smolvm"), 0o755)
	besideSup := file(filepath.Join(d, "beside", SupervisorProgram), 0o755)
	libexec := file(filepath.Join(d, "prefix", "bin", "smolvm"), 0o755)
	libexecSup := file(filepath.Join(d, "prefix", "libexec", "smolvm", SupervisorProgram), 0o755)
	link := filepath.Join(d, "links", "smolvm")
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(beside, link); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ bin, want string }{
		{alone, alone},
		{noexec, noexec},
		{dirNamed, dirNamed},
		{beside, besideSup},
		{libexec, libexecSup},
		{link, besideSup},
	} {
		if got := supervisorProgram(c.bin); got != c.want {
			t.Errorf("supervisorProgram(%s) = %s, want %s", c.bin, got, c.want)
		}
	}
}
