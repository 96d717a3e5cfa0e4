package qemu

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestPunchZeros: blocks of zeros are deallocated, data blocks kept, and
// the file reads the same afterwards.
func TestPunchZeros(t *testing.T) {
	const block = 4 << 10
	path := filepath.Join(t.TempDir(), "ram")
	var want []byte
	// data, 300 zero blocks, data, 2 zero blocks, data, then zeros to the end
	for _, part := range []struct {
		fill byte
		n    int
	}{{7, 3}, {0, 300}, {9, 1}, {0, 2}, {1, 1}, {0, 20}} {
		want = append(want, bytes.Repeat([]byte{part.fill}, part.n*block)...)
	}
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	used := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	before := used()
	if err := punchZeros(path); err != nil {
		t.Fatalf("punchZeros: %v", err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("contents changed")
	}
	if after := used(); after > 5*block+64<<10 || after >= before {
		t.Errorf("%d bytes allocated after punching (before %d); want about %d", after, before, 5*block)
	}
	// A second pass over a file that is mostly holes changes nothing.
	if err := punchZeros(path); err != nil {
		t.Fatalf("punchZeros again: %v", err)
	}
}
