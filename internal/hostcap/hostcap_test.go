package hostcap

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// A second holder waits for the lock and gives up when its context ends;
// it gets the lock once the first lets it go.
func TestLockWaits(t *testing.T) {
	dir := t.TempDir()
	l, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := Acquire(ctx, dir); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second Acquire while held: %v, want the context's deadline", err)
	}
	l.Release()
	l2, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatalf("Acquire after Release: %v", err)
	}
	l2.Release()
}

// The same state folder by two paths (a symbolic link) is one entry.
func TestRegisterOnce(t *testing.T) {
	dir, home := t.TempDir(), t.TempDir()
	link := t.TempDir() + "/link"
	if err := os.Symlink(home, link); err != nil {
		t.Fatal(err)
	}
	l, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	for _, h := range []string{home, link, home + "/."} {
		if err := l.Register(h); err != nil {
			t.Fatal(err)
		}
	}
	if ents, _ := os.ReadDir(dir + "/homes"); len(ents) != 1 {
		t.Errorf("%d entries for one state folder", len(ents))
	}
}

// A holder killed with SIGKILL (a create interrupted while it counts)
// leaves nothing that blocks the next create: the kernel drops its lock.
func TestLockOfKilledHolder(t *testing.T) {
	dir := t.TempDir()
	if err := ensureDir(dir); err != nil {
		t.Fatal(err)
	}
	// -o: the lock is flock(1)'s alone, not its child's too.
	holder := exec.Command("flock", "-o", filepath.Join(dir, "lock"), "sleep", "60")
	holder.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := holder.Start(); err != nil {
		t.Skipf("flock(1): %v", err)
	}
	defer func() { _ = syscall.Kill(-holder.Process.Pid, syscall.SIGKILL); _ = holder.Wait() }()
	held := false
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && !held; {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		l, err := Acquire(ctx, dir)
		cancel()
		if err == nil {
			l.Release() // flock(1) has not taken it yet
			continue
		}
		held = errors.Is(err, context.DeadlineExceeded)
	}
	if !held {
		t.Fatal("flock(1) never held the lock")
	}
	if err := holder.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = holder.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := Acquire(ctx, dir)
	if err != nil {
		t.Fatalf("Acquire after the holder was killed: %v", err)
	}
	l.Release()
}

// A spare counts while its record is there and its owner lives, in its
// own state folder and in every registered one (a folder with spares
// alone stays registered); Reclaim takes it off the count.
func TestSpares(t *testing.T) {
	dir, home, other := t.TempDir(), t.TempDir(), t.TempDir()
	l, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if err := l.Register(other); err != nil {
		t.Fatal(err)
	}
	mine := filepath.Join(SparesDir(home), "a")
	theirs := filepath.Join(SparesDir(other), "b")
	for _, d := range []string{mine, theirs} {
		if err := RecordSpare(d, 256); err != nil {
			t.Fatal(err)
		}
	}
	// A record whose owner is gone does not count.
	dead := filepath.Join(SparesDir(other), "c")
	if err := os.MkdirAll(dead, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dead, SpareFile), []byte(`{"owner": 999999999, "memory_mib": 256}`), 0o600); err != nil {
		t.Fatal(err)
	}
	alive := func(pid int) bool { return pid == os.Getpid() }
	got := l.Spares(home, alive)
	if len(got) != 2 || got[0].Dir != mine || got[1].Dir != theirs || got[0].MemoryMiB != 256 || got[0].Owner != os.Getpid() {
		t.Fatalf("Spares: %+v, want %s and %s", got, mine, theirs)
	}
	// The other folder holds no VM, but a spare: it stays registered.
	if _, _, err := l.Others(context.Background(), home, alive); err != nil {
		t.Fatal(err)
	}
	if got := l.Spares(home, alive); len(got) != 2 {
		t.Errorf("Spares after Others: %+v; the folder with a spare left the registry", got)
	}
	if !l.Reclaim(got[1]) || SpareRecorded(theirs) || l.Reclaim(got[1]) {
		t.Error("Reclaim did not take the spare off the count once")
	}
	if got := l.Spares(home, alive); len(got) != 1 || got[0].Dir != mine {
		t.Errorf("Spares after Reclaim: %+v", got)
	}
}

// BenchmarkGiveWay is what a create pays to learn that no spare needs to
// give way (the usual case): a look for spares without the lock, with 8
// registered state folders.
func BenchmarkGiveWay(b *testing.B) {
	dir, home := b.TempDir(), b.TempDir()
	l, err := Acquire(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}
	for range 8 {
		if err := l.Register(b.TempDir()); err != nil {
			b.Fatal(err)
		}
	}
	l.Release()
	for b.Loop() {
		if len(SparesOn(dir, home, nil)) != 0 {
			b.Fatal("spares")
		}
	}
}
