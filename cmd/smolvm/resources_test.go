package main

// Tests of the bounds on what one VM can take of the host: its console
// log, copies out of it, its state folder.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testutil"
)

// consoleSize is what a VM's console log holds on disk, both of its files.
func consoleSize(t *testing.T, home, id string) int64 {
	t.Helper()
	var n int64
	for _, f := range []string{"console.log", "console.log.1"} {
		if fi, err := os.Stat(filepath.Join(home, "vms", id, f)); err == nil {
			n += fi.Size()
		}
	}
	return n
}

// flood makes the guest write n bytes of lines to its console between a
// start and an end marker, and waits until 'smolvm logs' shows the end.
func flood(t *testing.T, home, id string, n int) string {
	t.Helper()
	script := fmt.Sprintf("echo FLOOD-START > /dev/console; yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c %d > /dev/console; echo FLOOD-END > /dev/console", n)
	mustOK(t, home, "", "exec", id, "--", "sh", "-c", script)
	var out string
	if err := testutil.Poll(3*time.Minute, func() bool {
		out = smolvmRun(t, home, "", "logs", id).stdout
		return strings.Contains(out, "FLOOD-END")
	}); err != nil {
		t.Fatalf("the console's last line never reached the log: %v", err)
	}
	return out
}

// TestConsoleLogBounded: a guest that floods its console leaves at most
// the console log's bound on the host (1 MiB unless --console-log-size
// says otherwise), the newest part; 'smolvm logs -f' following the whole
// flood sees all of it; the guest keeps working. Before the bound,
// console.log grew by all the guest wrote.
func TestConsoleLogBounded(t *testing.T) {
	home := testutil.Home(t)
	id := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "flood").stdout)

	t.Run("Default", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		follow := exec.CommandContext(ctx, testutil.Binary(t), "logs", "-f", id)
		follow.Env = append(os.Environ(), "SMOLVM_HOME="+home)
		var followed testutil.SyncBuffer
		follow.Stdout = &followed
		if err := follow.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cancel(); _ = follow.Wait() }()

		out := flood(t, home, id, 5<<19) // 2.5 MiB
		if n := consoleSize(t, home, id); n > 1<<20 {
			t.Errorf("console log holds %d bytes after a 2.5 MiB flood, want at most 1 MiB", n)
		}
		if len(out) > 1<<20 || strings.Contains(out, "FLOOD-START") {
			t.Errorf("logs printed %d bytes (start marker kept: %v); want the newest 1 MiB at most",
				len(out), strings.Contains(out, "FLOOD-START"))
		}
		if err := testutil.Poll(time.Minute, func() bool { return strings.Contains(followed.String(), "FLOOD-END") }); err != nil {
			t.Fatalf("logs -f never printed the end of the flood: %v", err)
		}
		if got := followed.String(); !strings.Contains(got, "FLOOD-START") || len(got) < 5<<19 {
			t.Errorf("logs -f printed %d bytes (start marker: %v); want all of the 2.5 MiB flood",
				len(got), strings.Contains(got, "FLOOD-START"))
		}
		if r := mustOK(t, home, "", "exec", id, "--", "echo", "alive"); r.stdout != "alive\n" {
			t.Errorf("after the flood the guest answered %q", r.stdout)
		}
	})

	t.Run("Flag", func(t *testing.T) {
		small := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "small", "--console-log-size", "64K").stdout)
		flood(t, home, small, 256<<10)
		if n := consoleSize(t, home, small); n > 64<<10 {
			t.Errorf("console log of a VM made with --console-log-size 64K holds %d bytes", n)
		}
		if r := smolvmRun(t, home, "", "create", "--console-log-size", "1K"); r.code != 3 || !strings.Contains(r.stderr, "at least") {
			t.Errorf("create --console-log-size 1K: exit %d, %q; want exit 3 naming the least size", r.code, r.stderr)
		}
	})
}

// smallDisk mounts a tmpfs of size bytes for the test (root only).
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a %s tmpfs: %v: %s", size, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// entries lists a folder's names.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestCopyOutBounded: 'smolvm cp VM:… DIR' onto a 64 MiB disk. A sparse
// 10 GiB file copies sparsely (its holes stay holes), a folder with a
// sparse file too; a file bigger than the disk is refused before anything
// is written, naming the disk and the size; a folder whose files do not
// fit fails naming the full disk. Nothing half-written is left. Before,
// the sparse copy wrote zeros until the disk was full and left the
// partial file.
func TestCopyOutBounded(t *testing.T) {
	small := smallDisk(t, "64m")
	home := testutil.Home(t)
	id := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "cpout").stdout)
	mustOK(t, home, "", "exec", id, "--", "sh", "-ec", `
		truncate -s 10G /tmp/sparse
		echo middle | dd of=/tmp/sparse bs=1M seek=5000 conv=notrunc 2>/dev/null
		yes smolvm | head -c 83886080 > /tmp/big
		mkdir -p /tmp/tree/sub /tmp/bigtree
		truncate -s 200M /tmp/tree/sub/holes
		echo hi > /tmp/tree/hi
		cp /tmp/big /tmp/bigtree/big`)

	t.Run("SparseFile", func(t *testing.T) {
		mustOK(t, home, "", "cp", id+":/tmp/sparse", small+"/")
		p := filepath.Join(small, "sparse")
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Size() != 10<<30 || st.Blocks*512 > 1<<20 {
			t.Errorf("copy is %d bytes taking %d on disk; want 10 GiB taking at most 1 MiB", fi.Size(), st.Blocks*512)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 7)
		if _, err := f.ReadAt(buf, 5000<<20); err != nil || string(buf) != "middle\n" {
			t.Errorf("at 5000 MiB the copy has %q, %v; want the data written there", buf, err)
		}
		f.Close()
		os.Remove(p)
	})

	t.Run("SparseTree", func(t *testing.T) {
		mustOK(t, home, "", "cp", id+":/tmp/tree", small+"/")
		fi, err := os.Stat(filepath.Join(small, "tree", "sub", "holes"))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); fi.Size() != 200<<20 || st.Blocks*512 > 1<<20 {
			t.Errorf("copy is %d bytes taking %d on disk; want 200 MiB of holes", fi.Size(), st.Blocks*512)
		}
		if b, err := os.ReadFile(filepath.Join(small, "tree", "hi")); err != nil || string(b) != "hi\n" {
			t.Errorf("tree/hi: %q, %v", b, err)
		}
		os.RemoveAll(filepath.Join(small, "tree"))
	})

	t.Run("TooBigFile", func(t *testing.T) {
		r := smolvmRun(t, home, "", "cp", id+":/tmp/big", small+"/")
		if r.code == 0 || !strings.Contains(r.stderr, "not enough space on "+small) || !strings.Contains(r.stderr, "80.0 MiB") {
			t.Errorf("cp of 80 MiB onto 64 MiB: exit %d, %q; want an error naming %s and the size", r.code, r.stderr, small)
		}
		if left := entries(t, small); len(left) > 0 {
			t.Errorf("a refused copy left %v", left)
		}
	})

	t.Run("TooBigTree", func(t *testing.T) {
		r := smolvmRun(t, home, "", "cp", id+":/tmp/bigtree", small+"/")
		if r.code == 0 || !strings.Contains(r.stderr, "no space left on "+small) {
			t.Errorf("cp of a folder of 80 MiB onto 64 MiB: exit %d, %q; want an error naming %s", r.code, r.stderr, small)
		}
		if left := entries(t, small); len(left) > 0 {
			t.Errorf("a failed copy left %v", left)
		}
	})
}

// fill writes a file in dir until its disk is full.
func fill(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{1}, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	buf = buf[:512]
	for { // the last bits
		if _, err := f.Write(buf); err != nil {
			return
		}
	}
}

// TestFullStateFolder: with the state folder's disk full, creating a VM
// fails with an error that names the disk and what to do, and leaves no
// state row; the database and the VM already there keep working, and VMs
// can still be deleted to make room. Before, the create failed with
// SQLite's "database or disk is full (13)", and so did 'smolvm rm'.
func TestFullStateFolder(t *testing.T) {
	home := testutil.Home(t)
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", home).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs on %s: %v: %s", home, err, out)
	}
	t.Cleanup(func() {
		smolvmRun(t, home, "", "rm", "-f", "--all")
		// The killed VMs' processes may still be on their way out and
		// hold the mount ("target is busy") for a moment.
		var out []byte
		if err := testutil.Poll(time.Minute, func() bool {
			var err error
			out, err = exec.Command("umount", home).CombinedOutput()
			return err == nil
		}); err != nil {
			t.Errorf("umount %s: %v: %s", home, err, out)
		}
	})
	if err := os.Symlink(testutil.CacheDir(), filepath.Join(home, "cache")); err != nil {
		t.Fatal(err)
	}
	a := strings.TrimSpace(mustOK(t, home, "", "create", "--name", "a").stdout)
	mustOK(t, home, "", "create", "--name", "b")
	fill(t, home)

	r := smolvmRun(t, home, "", "create", "--name", "c")
	if r.code == 0 || !strings.Contains(r.stderr, "no space left on "+home) || !strings.Contains(r.stderr, "free space there") {
		t.Errorf("create on a full disk: exit %d, %q; want an error naming %s and what to do", r.code, r.stderr, home)
	}
	vms := listVMs(t, home)
	if len(vms) != 2 || vms[0].State != "running" || vms[1].State != "running" {
		t.Errorf("after the failed create: %+v; want a and b running, nothing else", vms)
	}
	if r := mustOK(t, home, "", "exec", a, "--", "echo", "alive"); r.stdout != "alive\n" {
		t.Errorf("VM a answered %q", r.stdout)
	}
	mustOK(t, home, "", "rm", "-f", "b") // deleting makes room, even on a full disk
	if vms := listVMs(t, home); len(vms) != 1 || vms[0].ID != a {
		t.Errorf("after rm b: %+v; want a alone", vms)
	}
	if err := os.Remove(filepath.Join(home, "filler")); err != nil {
		t.Fatal(err)
	}
	mustOK(t, home, "", "create", "--name", "c")
}
