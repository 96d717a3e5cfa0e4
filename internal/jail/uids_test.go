package jail

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestSubIDs(t *testing.T) {
	p := filepath.Join(t.TempDir(), "subuid")
	if err := os.WriteFile(p, []byte("root:100000:65536\n"+User+":165536:1000\n"+User+":300000:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r, err := subIDs(p); err != nil || r != (IDRange{Start: 165536, Count: 1000}) {
		t.Errorf("subIDs: %+v, %v", r, err)
	}
	if r, err := subIDs(filepath.Join(t.TempDir(), "none")); err != nil || r.Count != 0 {
		t.Errorf("a missing file: %+v, %v", r, err)
	}
}

// Folders get ids of their own; a folder keeps its id; an id whose
// folder is gone (and no process runs as it) is free again.
func TestAlloc(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("allocates in " + UIDDir + " (root only)")
	}
	// A range of its own, far from the one setup reserves.
	r := IDRange{Start: 1<<31 - 4096, Count: 4}
	a, b := t.TempDir(), t.TempDir()
	ida, err := r.Alloc(a)
	if err != nil {
		t.Fatal(err)
	}
	idb, err := r.Alloc(b)
	if err != nil {
		t.Fatal(err)
	}
	if ida == idb {
		t.Fatalf("two folders share id %d", ida)
	}
	if again, err := r.Alloc(a); err != nil || again != ida {
		t.Errorf("a folder's second allocation: %d, %v; want its id %d", again, err, ida)
	}
	if !r.Held(ida) {
		t.Errorf("id %d of an existing folder is not held", ida)
	}
	if err := os.RemoveAll(a); err != nil {
		t.Fatal(err)
	}
	if r.Held(ida) {
		t.Errorf("id %d held after its folder was removed", ida)
	}
	c := t.TempDir()
	if idc, err := r.Alloc(c); err != nil || idc != ida {
		t.Errorf("a new folder got %d, %v; want the freed %d", idc, err, ida)
	}
	t.Cleanup(func() {
		for i := range r.Count {
			_ = os.Remove(filepath.Join(UIDDir, strconv.FormatUint(uint64(r.Start+i), 10)))
		}
	})
}

// BenchmarkAlloc is what a QEMU start pays for its uid: the lock, the
// records' read and one write (a new folder each time, in a range of
// its own whose records are removed between runs).
func BenchmarkAlloc(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("root only")
	}
	r := IDRange{Start: 1<<31 - 8192, Count: 64}
	dir := b.TempDir()
	for b.Loop() {
		if _, err := r.Alloc(dir); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		for i := range r.Count {
			_ = os.Remove(filepath.Join(UIDDir, strconv.FormatUint(uint64(r.Start+i), 10)))
		}
		b.StartTimer()
	}
}
