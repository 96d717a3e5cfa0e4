package jail

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// setIDChildEnv, set, makes the test binary the child of TestNoSetID:
// it tries setid.go's calls in the folder the variable names.
const setIDChildEnv = "SMOLVM_JAIL_TEST_SETID_CHILD"

// setIDCall is one call of the child's, with what the filter must
// answer (nil: allowed).
type setIDCall struct {
	name string
	want error
	call func() error
}

// setIDCalls are what the child tries.
func setIDCalls(dir string) []setIDCall {
	p := func(name string) string { return filepath.Join(dir, name) }
	create := func(name string, flags int, mode uint32) func() error {
		return func() error {
			fd, err := unix.Open(p(name), flags, mode)
			if err == nil {
				unix.Close(fd)
			}
			return err
		}
	}
	fchmod := func(mode uint32) func() error {
		return func() error {
			fd, err := unix.Open(p("plain"), unix.O_RDONLY, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Fchmod(fd, mode)
		}
	}
	calls := []setIDCall{
		{"create 0644", nil, create("plain", unix.O_CREAT|unix.O_WRONLY, 0o644)},
		{"chmod 0755", nil, func() error { return unix.Fchmodat(unix.AT_FDCWD, p("plain"), 0o755, 0) }},
		{"chmod 4755", unix.EPERM, func() error { return unix.Fchmodat(unix.AT_FDCWD, p("plain"), 0o4755, 0) }},
		{"chmod 2755", unix.EPERM, func() error { return unix.Fchmodat(unix.AT_FDCWD, p("plain"), 0o2755, 0) }},
		{"fchmod 6755", unix.EPERM, fchmod(0o6755)},
		{"fchmod 0700", nil, fchmod(0o700)},
		{"fchmodat2 4755", unix.EPERM, func() error {
			cwd := unix.AT_FDCWD
			_, _, e := unix.Syscall6(unix.SYS_FCHMODAT2, uintptr(cwd), uintptr(unsafe.Pointer(bytePtr(p("plain")))), 0o4755, 0, 0, 0)
			return errnoErr(e)
		}},
		{"openat O_CREAT 4755", unix.EPERM, create("suid", unix.O_CREAT|unix.O_WRONLY, 0o4755)},
		{"openat O_TMPFILE 2755", unix.EPERM, create("", unix.O_TMPFILE|unix.O_WRONLY, 0o2755)},
		{"openat no O_CREAT, mode 4755", nil, create("plain", unix.O_RDONLY, 0o4755)},
		{"mknodat 4755", unix.EPERM, func() error { return unix.Mknodat(unix.AT_FDCWD, p("node"), unix.S_IFREG|0o4755, 0) }},
		{"mknodat 0644", nil, func() error { return unix.Mknodat(unix.AT_FDCWD, p("node"), unix.S_IFREG|0o644, 0) }},
		{"openat2", unix.ENOSYS, func() error {
			fd, err := unix.Openat2(unix.AT_FDCWD, p("plain"), &unix.OpenHow{Flags: unix.O_RDONLY})
			if err == nil {
				unix.Close(fd)
			}
			return err
		}},
		{"setxattr", unix.EOPNOTSUPP, func() error { return unix.Setxattr(p("plain"), "user.smolvm", []byte("x"), 0) }},
		{"io_uring_setup", unix.ENOSYS, func() error {
			_, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, 0, 0)
			return errnoErr(e)
		}},
	}
	return append(calls, legacySetIDCalls(p)...)
}

func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// A process started with NoSetID cannot give a file a setuid or setgid
// bit, by any call, nor write an extended attribute, but makes and
// chmods files otherwise; the filter stays with it: once it is released
// no thread of this process has a filter, and this process still can.
func TestNoSetID(t *testing.T) {
	if dir := os.Getenv(setIDChildEnv); dir != "" {
		for _, c := range setIDCalls(dir) {
			fmt.Printf("call %s: %v\n", c.name, c.call())
		}
		return
	}
	before := threadsSeccomp(t)
	dir := t.TempDir()
	t.Setenv(setIDChildEnv, dir)
	out, err := runJailed(t, &Jail{NoSetID: true}, os.Args[0], "-test.run=^TestNoSetID$")
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	for _, c := range setIDCalls(dir) {
		want := fmt.Sprintf("call %s: %v\n", c.name, c.want)
		if !strings.Contains(out, want) {
			t.Errorf("want %q", want)
		}
	}
	if t.Failed() {
		t.Logf("child said:\n%s", out)
	}
	noSetIDFiles(t, dir)

	// The thread that started the child has ended with its release;
	// wait for it (it ends just after).
	deadline := time.Now().Add(30 * time.Second)
	for now := threadsSeccomp(t); now != before; now = threadsSeccomp(t) {
		if time.Now().After(deadline) {
			t.Fatalf("threads with a seccomp filter after release: %s (before: %s)", now, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	f := filepath.Join(dir, "parent")
	if err := os.WriteFile(f, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(f, 0o755|os.ModeSetuid); err != nil {
		t.Fatalf("this process can no longer set a setuid bit: %v", err)
	}
	if fi, err := os.Stat(f); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Fatalf("chmod u+s by this process: %v %v", fi.Mode(), err)
	}
}

// threadsSeccomp sums this process's threads' seccomp and no_new_privs
// state ("filters/no_new_privs threads").
func threadsSeccomp(t *testing.T) string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	filters, nnp := 0, 0
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", task.Name(), "status"))
		if err != nil {
			continue // ended meanwhile
		}
		for _, l := range strings.Split(string(b), "\n") {
			k, v, _ := strings.Cut(l, ":")
			v = strings.TrimSpace(v)
			switch {
			case k == "Seccomp_filters" && v != "0":
				filters++
			case k == "NoNewPrivs" && v != "0":
				nnp++
			}
		}
	}
	return fmt.Sprintf("%d/%d", filters, nnp)
}

// noSetIDFiles fails the test if a file in dir has a setuid or setgid bit.
func noSetIDFiles(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&(os.ModeSetuid|os.ModeSetgid) != 0 {
			t.Errorf("%s has mode %v", e.Name(), fi.Mode())
		}
	}
}

// In a jail as virtiofsd's (root of a user namespace mapped to the owner
// of a writable folder, here root), a shell cannot make a setuid or
// setgid file in the folder, but chmods others.
func TestNoSetIDJailed(t *testing.T) {
	needRoot(t)
	shared, src := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "suid"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(src, "suid"), 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	j := &Jail{Root: t.TempDir(), UserNS: &IDMap{}, NoSetID: true,
		Binds: []Bind{{Source: shared, Target: "/mnt"}, {Source: src, Target: "/src", ReadOnly: true}}}
	out, err := runJailed(t, j, "/bin/sh", "-c", "cd /mnt && touch f && chmod 755 f && cp -p /bin/true t && echo ok; "+
		"chmod 4755 f; chmod g+s f; mkdir d; chmod 2755 d; cp -p /src/suid s; chmod u+s t; true")
	t.Logf("jailed shell said:\n%s", out)
	if err != nil || !strings.HasPrefix(out, "ok\n") || strings.Count(out, "Operation not permitted") != 5 {
		t.Errorf("jailed shell: %v: %q; want ok and 5 refusals", err, out)
	}
	noSetIDFiles(t, shared)
	for _, name := range []string{"f", "t"} { // s: cp leaves it 0700
		if fi, err := os.Stat(filepath.Join(shared, name)); err != nil || fi.Mode().Perm() != 0o755 {
			t.Errorf("%s: %v %v; want mode 0755", name, fi.Mode(), err)
		}
	}
}

// bytePtr is s as a C string, for raw system calls.
func bytePtr(s string) *byte {
	b, err := unix.BytePtrFromString(s)
	if err != nil {
		panic(err)
	}
	return b
}
