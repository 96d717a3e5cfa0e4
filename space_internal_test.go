package smolvm

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestSparseFile: blocks of zeros written through sparseFile become holes,
// whatever the pieces they come in; the content reads back the same.
func TestSparseFile(t *testing.T) {
	var want bytes.Buffer
	want.Write(bytes.Repeat([]byte{0}, 1<<20))     // a hole
	want.Write(bytes.Repeat([]byte("data"), 3000)) // 12000 bytes, not block-aligned
	want.Write(bytes.Repeat([]byte{0}, 2<<20))     // a hole
	want.WriteString("end")
	want.Write(bytes.Repeat([]byte{0}, 5000)) // zeros at the end: the size keeps them
	for _, piece := range []int{1000, 4096, 32 << 10, 1 << 22} {
		p := filepath.Join(t.TempDir(), "f")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		sf := &sparseFile{f: f}
		for b := want.Bytes(); len(b) > 0; {
			k := min(piece, len(b))
			if _, err := sf.Write(b[:k]); err != nil {
				t.Fatal(err)
			}
			b = b[k:]
		}
		if err := sf.finish(int64(want.Len())); err != nil {
			t.Fatal(err)
		}
		f.Close()
		got, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(got, want.Bytes()) {
			t.Fatalf("pieces of %d: read back %d bytes (%v), want the %d written", piece, len(got), err, want.Len())
		}
		fi, _ := os.Stat(p)
		if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used > 64<<10 {
			t.Errorf("pieces of %d: the file takes %d bytes on disk; want its 12 KB of data in a few blocks", piece, used)
		}
	}
}
