package agent

import (
	"os"
	"path/filepath"
	"testing"
)

// The id → name cache answers from memory while the file is unchanged and
// reads it again once it changes.
func TestIDCache(t *testing.T) {
	p := filepath.Join(t.TempDir(), "passwd")
	if err := os.WriteFile(p, []byte("root:x:0:0::/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := &idCache{path: p}
	if got := c.get()[0]; got != "root" {
		t.Fatalf("uid 0 = %q; want root", got)
	}
	if got := c.get(); len(got) != 1 {
		t.Fatalf("unchanged file: %v", got)
	}
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("dirowner:x:1234:1234::/:/bin/sh\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got := c.get()[1234]; got != "dirowner" {
		t.Fatalf("after an append, uid 1234 = %q; want dirowner", got)
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if got := c.get(); len(got) != 0 {
		t.Fatalf("missing file: %v; want no names", got)
	}
}
