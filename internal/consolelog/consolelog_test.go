package consolelog_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/consolelog"
	"github.com/smolvm/smolvm/internal/testutil"
)

// size is what the log at path holds on disk, both files.
func size(t *testing.T, path string) int64 {
	t.Helper()
	var n int64
	for _, p := range []string{path, path + consolelog.Old} {
		if fi, err := os.Stat(p); err == nil {
			n += fi.Size()
		}
	}
	return n
}

// TestBounded: however much is written, in whatever pieces, the two files
// hold at most the bound, and what they hold is the newest output, in order.
func TestBounded(t *testing.T) {
	for _, piece := range []int{1, 100, 4096, 40 << 10, 1 << 20} {
		t.Run(fmt.Sprint(piece), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "console.log")
			const limit = 64 << 10
			l, err := consolelog.Open(path, limit)
			if err != nil {
				t.Fatal(err)
			}
			var all bytes.Buffer
			for i := 0; all.Len() < 300<<10; i++ {
				line := fmt.Sprintf("line %d\n", i)
				all.WriteString(line)
			}
			for b := all.Bytes(); len(b) > 0; {
				k := min(piece, len(b))
				if n, err := l.Write(b[:k]); n != k || err != nil {
					t.Fatalf("write = %d, %v", n, err)
				}
				b = b[k:]
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if n := size(t, path); n > limit || n < limit/2 {
				t.Errorf("log holds %d bytes, want %d to %d", n, limit/2, limit)
			}
			var got bytes.Buffer
			if err := consolelog.Copy(&got, path); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasSuffix(all.Bytes(), got.Bytes()) {
				t.Errorf("the log (%d bytes) is not the end of what was written", got.Len())
			}
			if tail := consolelog.Tail(path, 2); !strings.HasSuffix(tail, strings.TrimSpace(lastLine(all.String()))) {
				t.Errorf("tail %q does not end with the last line", tail)
			}
		})
	}
}

func lastLine(s string) string {
	s = strings.TrimSuffix(s, "\n")
	return s[strings.LastIndex(s, "\n")+1:]
}

// TestReopen: a log opened again (a VM booted again) goes on after what it
// holds, within the same bound; Move changes the bound and the path.
func TestReopen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	if err := os.WriteFile(path, bytes.Repeat([]byte("old\n"), 50<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := consolelog.Open(path, 0) // the default bound: the 200 KB file is kept
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]byte("new\n")); err != nil {
		t.Fatal(err)
	}
	if n := size(t, path); n != 200<<10+4 {
		t.Errorf("log holds %d bytes, want %d", n, 200<<10+4)
	}
	moved := filepath.Join(t.TempDir(), "console.log")
	if err := os.Rename(path, moved); err != nil {
		t.Fatal(err)
	}
	l.Move(moved, consolelog.MinMaxBytes)
	if _, err := l.Write(bytes.Repeat([]byte("x"), 100<<10)); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n := size(t, moved); n > consolelog.MinMaxBytes {
		t.Errorf("moved log holds %d bytes, want at most %d", n, consolelog.MinMaxBytes)
	}
	if _, err := os.Stat(path + consolelog.Old); err == nil {
		t.Error("the log rotated in its old folder")
	}
}

// TestFollow: a follower sees everything written while it follows, across
// rotations, in order.
func TestFollow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := consolelog.Open(path, consolelog.MinMaxBytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]byte("before\n")); err != nil {
		t.Fatal(err)
	}
	var out testutil.SyncBuffer
	written := make(chan struct{})
	done := make(chan error)
	go func() {
		done <- consolelog.Follow(context.Background(), &out, path, time.Millisecond, func() bool {
			select {
			case <-written:
				return false
			default:
				return true
			}
		})
	}()
	var want strings.Builder
	want.WriteString("before\n")
	for i := 0; i < 3000; i++ {
		line := fmt.Sprintf("line %d\n", i)
		want.WriteString(line)
		if _, err := l.Write([]byte(line)); err != nil {
			t.Fatal(err)
		}
		if i%100 == 99 { // a follower keeps up with a console: wait for it
			if err := testutil.Poll(time.Minute, func() bool { return strings.HasSuffix(out.String(), line) }); err != nil {
				t.Fatalf("the follower did not copy %q: %v", line, err)
			}
		}
	}
	close(written)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := out.String(); !strings.HasPrefix(got, "before\n") || !strings.HasSuffix(got, "line 2999\n") {
		t.Errorf("follow printed %d bytes: %q … %q", len(got), got[:min(40, len(got))], got[max(0, len(got)-40):])
	}
}
