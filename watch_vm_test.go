package smolvm_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/testutil"
)

// watchUntil reads w's events until want (op and path) arrives and
// returns all it read, or fails after a minute.
func watchUntil(t *testing.T, w *smolvm.DirWatch, op smolvm.DirOp, path string) []smolvm.DirEvent {
	t.Helper()
	var got []smolvm.DirEvent
	timeout := time.After(time.Minute)
	for {
		select {
		case ev, ok := <-w.Events():
			if !ok {
				t.Fatalf("watch ended (%v) before %s %s; got %v", w.Err(), op, path, got)
			}
			got = append(got, ev)
			if ev.Op == op && ev.Path == path {
				return got
			}
		case <-timeout:
			t.Fatalf("no %s %s within a minute; got %v", op, path, got)
		}
	}
}

func run(t *testing.T, vm *smolvm.VM, script string) {
	t.Helper()
	if out, err := vm.Command(testCtx(t), "sh", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", script, err, out)
	}
}

// TestWatchDir: VM.WatchDir reports creates, writes, renames and removes
// under a folder as inotify sees them, the first change right after it
// returns included; recursively also in a subfolder made later, and not
// without recursive; the folder's removal ends it.
func TestWatchDir(t *testing.T) {
	t.Parallel()
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	dir := uniq(t)
	run(t, vm, "mkdir -p "+dir+"/flat")

	w, err := vm.WatchDir(ctx, dir, true)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// The first change, at once: the watch is in place when WatchDir returns.
	run(t, vm, "echo a > "+dir+"/f")
	watchUntil(t, w, smolvm.DirCreate, dir+"/f")
	watchUntil(t, w, smolvm.DirWrite, dir+"/f")
	run(t, vm, "mv "+dir+"/f "+dir+"/g")
	watchUntil(t, w, smolvm.DirRename, dir+"/f")
	watchUntil(t, w, smolvm.DirCreate, dir+"/g")
	run(t, vm, "chmod 600 "+dir+"/g")
	watchUntil(t, w, smolvm.DirChmod, dir+"/g")
	run(t, vm, "rm "+dir+"/g")
	watchUntil(t, w, smolvm.DirRemove, dir+"/g")
	// A subfolder made after the watch started, and one below it at once.
	run(t, vm, "mkdir -p "+dir+"/sub/deep && echo x > "+dir+"/sub/deep/x")
	watchUntil(t, w, smolvm.DirCreate, dir+"/sub")
	watchUntil(t, w, smolvm.DirCreate, dir+"/sub/deep/x")
	run(t, vm, "echo y > "+dir+"/sub/deep/y")
	watchUntil(t, w, smolvm.DirCreate, dir+"/sub/deep/y")
	// A renamed folder reports under its new name, not the old one (a
	// file made at once is found when the folder is watched again).
	run(t, vm, "mv "+dir+"/sub "+dir+"/moved && echo z > "+dir+"/moved/deep/z")
	got := watchUntil(t, w, smolvm.DirCreate, dir+"/moved/deep/z")
	run(t, vm, "echo w > "+dir+"/moved/deep/w")
	got = append(got, watchUntil(t, w, smolvm.DirWrite, dir+"/moved/deep/w")...)
	for _, ev := range got {
		if ev.Path == dir+"/sub/deep/z" || ev.Path == dir+"/sub/deep/w" {
			t.Errorf("event under the folder's old name: %v", ev)
		}
	}

	// Without recursive, a subfolder's changes are not reported.
	flat, err := vm.WatchDir(ctx, dir+"/flat", false)
	if err != nil {
		t.Fatal(err)
	}
	run(t, vm, "mkdir "+dir+"/flat/sub && echo x > "+dir+"/flat/sub/x && echo m > "+dir+"/flat/marker")
	for _, ev := range watchUntil(t, flat, smolvm.DirCreate, dir+"/flat/marker") {
		if strings.HasPrefix(ev.Path, dir+"/flat/sub/") {
			t.Errorf("a watch without recursive reported %v", ev)
		}
	}
	// The folder's removal ends the watch with ErrNotFound.
	run(t, vm, "rm -r "+dir+"/flat")
	for range flat.Events() {
	}
	if err := flat.Err(); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("watch of a removed folder ended with %v, want ErrNotFound", err)
	}
	w.Close()
	if err := w.Err(); err != nil {
		t.Errorf("Err after Close = %v", err)
	}
	if _, err := vm.WatchDir(ctx, dir+"/missing", false); !errors.Is(err, smolvm.ErrNotFound) {
		t.Errorf("watch of a missing folder: %v, want ErrNotFound", err)
	}
}

// TestWatchDirBounds: a reader that falls behind is told it lost events;
// the guest refuses a tree of more folders than its cap and more open
// watches than its cap, and a watch ended by its context frees its place.
func TestWatchDirBounds(t *testing.T) {
	// Not parallel: TestWatchDir's watches count against the cap too.
	vm := testutil.SharedVM(t)
	ctx := testCtx(t)
	dir := uniq(t)
	run(t, vm, "mkdir -p "+dir)

	// The reader does not read while 3000 files are made: more than the
	// 1024 events the host keeps for it. It is told it lost some.
	w, err := vm.WatchDir(ctx, dir, false)
	if err != nil {
		t.Fatal(err)
	}
	run(t, vm, "cd "+dir+" && i=0; while [ $i -lt 3000 ]; do : > f$i; i=$((i+1)); done")
	deadline := time.Now().Add(time.Minute)
	for len(w.Events()) < cap(w.Events()) { // the buffer and the overflow's place
		if time.Now().After(deadline) {
			t.Fatalf("%d events queued after a minute, want %d", len(w.Events()), cap(w.Events()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	var got []smolvm.DirEvent
	for len(w.Events()) > 0 {
		got = append(got, <-w.Events())
	}
	// Events flow again once the reader reads.
	run(t, vm, ": > "+dir+"/last")
	got = append(got, watchUntil(t, w, smolvm.DirCreate, dir+"/last")...)
	// (A few made last may still have been on their way, and fit.)
	if full := cap(w.Events()) - 1; len(got) <= full || got[full].Op != smolvm.DirOverflow || len(got) > 3000 {
		t.Errorf("%d events, the 1025th %v; want the buffer's 1024, then an overflow, fewer than 3001 in all", len(got), got[min(full, len(got)-1)])
	}
	w.Close()

	// A tree of more folders than a watch follows (8192) is refused, and
	// leaves nothing behind: the next watch works.
	run(t, vm, "mkdir "+dir+"/many && cd "+dir+"/many && seq 1 8200 | xargs mkdir")
	if _, err := vm.WatchDir(ctx, dir+"/many", true); !errors.Is(err, smolvm.ErrCapacity) || !strings.Contains(err.Error(), "8192") {
		t.Errorf("recursive watch of 8200 folders: %v, want ErrCapacity naming the cap", err)
	}
	if w, err := vm.WatchDir(ctx, dir+"/many", false); err != nil {
		t.Errorf("watch of the same folder, not recursive: %v", err)
	} else {
		w.Close()
	}
	run(t, vm, "rm -r "+dir+"/many")

	// The cap on open watches (32 in the guest) refuses the next one.
	wctx, cancel := context.WithCancel(ctx)
	var open []*smolvm.DirWatch
	for i := 0; ; i++ {
		w, err := vm.WatchDir(wctx, dir, false)
		if err != nil {
			if !errors.Is(err, smolvm.ErrCapacity) || !strings.Contains(err.Error(), "stop one first") {
				t.Errorf("watch %d: %v, want ErrCapacity naming the fix", i, err)
			}
			break
		}
		if i > 64 {
			t.Fatal("more than 64 watches open: no cap")
		}
		open = append(open, w)
	}
	cancel()
	for _, w := range open {
		for range w.Events() {
		}
		if w.Err() != nil {
			t.Errorf("watch ended by its context: %v", w.Err())
		}
	}
	// Their places are free again (the guest ends a stream when the host
	// cancels it; poll, that takes a moment).
	deadline = time.Now().Add(time.Minute)
	for {
		w, err := vm.WatchDir(ctx, dir, false)
		if err == nil {
			w.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the watches ended: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
