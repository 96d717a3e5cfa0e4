package hostcap

import (
	"context"
	"errors"
	"os"
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
